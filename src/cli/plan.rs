//! `motley plan-parallel ...`: parallel layouts without running anything.

use clap::Subcommand;

use crate::parallel::ranks::{AttnGroup, MoeGroup, ParallelConfig, ParallelLayout};
use crate::Result;

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
    }
}
