//! The activation store: every tensor a layer's backward needs is saved here, under a name the
//! layer declared in its inventory. This is where keep / offload / recompute policies act
//! (MEMO): the inventory says which tensors are kept or offloaded whole and which can be split
//! along tokens and recomputed.

use crate::backend::Backend;
use crate::model::routing::Routing;

/// How many elements a saved tensor has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extent {
    /// `n` elements per token.
    PerToken(usize),
    /// `n` elements per routed slot (token copy sent to an expert).
    PerSlot(usize),
    /// `n × h_e` elements per slot routed to expert `e` of width `h_e`.
    PerSlotWidth(usize),
    /// `n` elements per (sequence, head, position), independent of routing.
    PerHeadToken(usize),
}

/// MEMO's tensor rule: the layer input and the attention output (with its softmax statistics)
/// are kept or offloaded whole; every other tensor is per token and may be split and recomputed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Whole,
    TokenSplit,
}

/// One entry of a layer's skeletal inventory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: &'static str,
    pub extent: Extent,
    pub class: Class,
}

/// The saved state of one layer.
struct LayerSlots<B: Backend> {
    tensors: Vec<Option<B::Buf>>,
    routing: Option<Routing>,
}

/// Saved activations of every layer, checked against the declared inventory.
pub struct ActivationStore<B: Backend> {
    inventory: &'static [TensorSpec],
    layers: Vec<LayerSlots<B>>,
}

impl<B: Backend> ActivationStore<B> {
    pub fn new(inventory: &'static [TensorSpec], n_layers: usize) -> Self {
        let layers = (0..n_layers)
            .map(|_| LayerSlots { tensors: (0..inventory.len()).map(|_| None).collect(), routing: None })
            .collect();
        ActivationStore { inventory, layers }
    }

    pub fn inventory(&self) -> &'static [TensorSpec] {
        self.inventory
    }

    fn index(&self, name: &str) -> usize {
        self.inventory
            .iter()
            .position(|s| s.name == name)
            .unwrap_or_else(|| panic!("activation `{name}` is not in the layer inventory"))
    }

    pub fn save(&mut self, layer: usize, name: &str, buf: B::Buf) {
        let i = self.index(name);
        self.layers[layer].tensors[i] = Some(buf);
    }

    pub fn load(&self, layer: usize, name: &str) -> &B::Buf {
        let i = self.index(name);
        self.layers[layer].tensors[i].as_ref().unwrap_or_else(|| panic!("activation `{name}` of layer {layer} was not saved"))
    }

    pub fn save_routing(&mut self, layer: usize, routing: Routing) {
        self.layers[layer].routing = Some(routing);
    }

    pub fn routing(&self, layer: usize) -> &Routing {
        self.layers[layer].routing.as_ref().unwrap_or_else(|| panic!("routing of layer {layer} was not saved"))
    }

    /// Frees a layer's activations once its backward is done.
    pub fn release(&mut self, layer: usize) {
        let slots = &mut self.layers[layer];
        slots.tensors.iter_mut().for_each(|t| *t = None);
        slots.routing = None;
    }

    /// Elements currently held for `layer`.
    pub fn held_elements(&self, layer: usize) -> usize {
        self.layers[layer].tensors.iter().flatten().map(B::len).sum()
    }
}
