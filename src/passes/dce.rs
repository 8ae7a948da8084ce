//! Dead-node elimination: a PI engine pays for every node it is given, used or not.

use super::{Pass, PassContext};
use crate::ir::Model;
use anyhow::Result;

#[derive(Default)]
pub struct DeadNodes;

impl Pass for DeadNodes {
    fn run(&self, model: &mut Model, _ctx: &PassContext) -> Result<usize> {
        let (nodes, inits) = model.graph.remove_dead();
        Ok(nodes + inits)
    }
}
