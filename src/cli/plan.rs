//! `motley plan-parallel ...`: parallel layouts without running anything.

use clap::Subcommand;

use std::path::PathBuf;

use crate::config::Config;
use crate::parallel::planner::{self, ClusterModel, Gpu, SearchRequest, PRESETS};
use crate::parallel::ranks::{AttnGroup, MoeGroup, ParallelConfig, ParallelLayout};
use crate::{Error, Result};

#[derive(Subcommand)]
pub enum PlanParallel {
    /// The attention (TP×CP×DP×PP) and MoE (ETP×EP×EDP×PP) rank groups of one world.
    Groups {
        #[arg(long)]
        world: usize,
        #[arg(long, default_value_t = 1)]
        tp: usize,
        #[arg(long, default_value_t = 1)]
        cp: usize,
        #[arg(long, default_value_t = 1)]
        pp: usize,
        #[arg(long, default_value_t = 1)]
        etp: usize,
        #[arg(long, default_value_t = 1)]
        ep: usize,
        /// Axis order, fastest-varying first.
        #[arg(long, default_value = "tp-cp-ep-dp-pp")]
        order: String,
        /// Print JSON instead of a listing.
        #[arg(long)]
        json: bool,
    },
    /// Search folded parallel mappings for a cluster and predict MFU, throughput and memory.
    Search {
        /// A preset name (mixtral-8x7b, mixtral-8x22b, qwen2-57b-a14b, deepseek-v3, hmoe-0.4b,
        /// hmoe-3b, memo-7b/13b/30b/65b, motley-h100-ref) or a motley TOML config.
        #[arg(long)]
        model: String,
        #[arg(long)]
        gpus: usize,
        /// h100, h200 or a100.
        #[arg(long, default_value = "h100")]
        gpu: String,
        #[arg(long, default_value_t = 8)]
        gpus_per_node: usize,
        #[arg(long, default_value_t = 4096)]
        seq: usize,
        #[arg(long, default_value_t = 256)]
        global_batch: usize,
        /// Sequences per micro-batch (default: try 1, 2, 4, 8).
        #[arg(long)]
        micro_batch: Option<usize>,
        /// Whether MEMO's activation offload may be used: on or off.
        #[arg(long, default_value = "on")]
        memo: String,
        #[arg(long, default_value_t = 10)]
        top: usize,
        #[arg(long)]
        json: bool,
    },
}

fn cluster_model(name: &str) -> Result<ClusterModel> {
    if let Some(m) = planner::preset(name) {
        return Ok(m);
    }
    let path = PathBuf::from(name);
    if path.exists() {
        let c = Config::load(Some(&path), &[])?;
        return ClusterModel::from_config(&c.model, &c.moe);
    }
    Err(Error::config("--model", format!("\"{name}\""), format!("a preset ({}) or a path to a motley config", PRESETS.join(", "))))
}

pub fn run(command: PlanParallel) -> Result<()> {
    match command {
        PlanParallel::Groups { world, tp, cp, pp, etp, ep, order, json } => {
            let layout = ParallelLayout::new(&ParallelConfig { world, tp, cp, pp, ep, etp, order })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&layout.to_json()).expect("JSON of rank lists"));
                return Ok(());
            }
            println!("attention (TP×CP×DP×PP):");
            for g in AttnGroup::ALL {
                println!("  {:<9} {:?}", g.token(), layout.attention_groups(g));
            }
            println!("MoE (ETP×EP×EDP×PP):");
            for g in MoeGroup::ALL {
                println!("  {:<9} {:?}", g.token(), layout.moe_groups(g));
            }
            Ok(())
        }
        PlanParallel::Search { model, gpus, gpu, gpus_per_node, seq, global_batch, micro_batch, memo, top, json } => {
            let gpu = Gpu::by_name(&gpu).ok_or_else(|| Error::config("--gpu", format!("\"{gpu}\""), "h100, h200 or a100"))?;
            let memo = match memo.as_str() {
                "on" => true,
                "off" => false,
                other => return Err(Error::config("--memo", format!("\"{other}\""), "on or off")),
            };
            let mut req = SearchRequest::new(cluster_model(&model)?, gpus, gpu);
            req.gpus_per_node = gpus_per_node;
            req.seq = seq;
            req.global_batch = global_batch;
            req.micro_batch = micro_batch;
            req.memo = memo;
            let found = planner::search(&req)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&planner::to_json(&found, top)).expect("JSON of candidates"));
            } else {
                println!("{}", planner::render_table(&found, top));
                if let Some(best) = found.first() {
                    println!("{}", planner::explain(best));
                }
            }
            Ok(())
        }
    }
}
