//! Graph edits as patches, in the way of tract's `ModelPatch`: a patch is
//! built by reading the graph as it is, then applied in one step, and the
//! graph is checked after every apply. Building never sees a half-edited
//! graph, so node indices and producers stay valid while a patch is made,
//! and a rewrite that breaks the graph fails right where it was applied.
//!
//! Names come from `Names`, which knows every name the graph uses: user
//! graphs name things freely (PyTorch leaves nodes unnamed, shares equal
//! initializers, and a user's tensor may already be called `x_scale`).

use std::collections::{HashMap, HashSet};

use candle_onnx::onnx::{GraphProto, NodeProto, TensorProto};

use super::graph::node_name;

/// A graph that a patch left broken.
#[derive(Debug, thiserror::Error)]
#[error("the rewritten graph is malformed at node {node}: {problem}")]
pub struct Malformed {
    pub node: String,
    pub problem: String,
}

/// The names a graph uses (nodes, tensors, initializers), handing out
/// fresh ones for what patches add.
pub struct Names {
    used: HashSet<String>,
}

impl Names {
    pub fn of(graph: &GraphProto) -> Self {
        let mut used: HashSet<String> = HashSet::new();
        for node in &graph.node {
            used.insert(node.name.clone());
            used.extend(node.input.iter().chain(&node.output).cloned());
        }
        used.extend(graph.initializer.iter().map(|t| t.name.clone()));
        used.extend(graph.input.iter().chain(&graph.output).chain(&graph.value_info).map(|v| v.name.clone()));
        Self { used }
    }

    /// `base`, or `base_1`, `base_2`, ... whichever is free first.
    pub fn fresh(&mut self, base: &str) -> String {
        if self.used.insert(base.to_string()) {
            return base.to_string();
        }
        (1..)
            .map(|n| format!("{base}_{n}"))
            .find(|candidate| self.used.insert(candidate.clone()))
            .expect("some suffix is free")
    }
}

/// Where an added node goes: nodes stay in topological order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Place {
    /// Before every existing node (it reads constants or graph inputs).
    First,
    /// Right after existing node `i` (it reads that node's outputs).
    After(usize),
}

/// Edits against one graph, by the indices of its existing nodes.
#[derive(Debug, Default)]
pub struct Patch {
    initializers: Vec<TensorProto>,
    added: Vec<(Place, NodeProto)>,
    removed: HashSet<usize>,
    /// (node, input slot) -> tensor; a slot past the end extends the inputs.
    inputs: HashMap<(usize, usize), String>,
    /// (node, output slot) -> tensor.
    outputs: HashMap<(usize, usize), String>,
    /// Every read of a tensor -> another tensor, in every node.
    renamed_reads: HashMap<String, String>,
}

impl Patch {
    pub fn is_empty(&self) -> bool {
        self.initializers.is_empty()
            && self.added.is_empty()
            && self.removed.is_empty()
            && self.inputs.is_empty()
            && self.outputs.is_empty()
            && self.renamed_reads.is_empty()
    }

    pub fn add_initializer(&mut self, tensor: TensorProto) {
        self.initializers.push(tensor);
    }

    pub fn add_node(&mut self, place: Place, node: NodeProto) {
        self.added.push((place, node));
    }

    pub fn remove_node(&mut self, node: usize) {
        self.removed.insert(node);
    }

    /// Makes input `slot` of existing node `node` read `tensor`.
    pub fn set_input(&mut self, node: usize, slot: usize, tensor: String) {
        self.inputs.insert((node, slot), tensor);
    }

    pub fn set_output(&mut self, node: usize, slot: usize, tensor: String) {
        self.outputs.insert((node, slot), tensor);
    }

    /// Makes every node that reads `from` read `to` instead.
    pub fn rename_reads(&mut self, from: String, to: String) {
        self.renamed_reads.insert(from, to);
    }

    /// Applies every edit, drops initializers nothing reads any more, and
    /// checks the result.
    pub fn apply(self, graph: &mut GraphProto) -> Result<(), Malformed> {
        let mut old = std::mem::take(&mut graph.node);
        for node in &mut old {
            for input in node.input.iter_mut() {
                if let Some(to) = self.renamed_reads.get(input) {
                    *input = to.clone();
                }
            }
        }
        for (&(node, slot), tensor) in &self.inputs {
            let inputs = &mut old[node].input;
            if inputs.len() <= slot {
                inputs.resize(slot + 1, String::new());
            }
            inputs[slot] = tensor.clone();
        }
        for (&(node, slot), tensor) in &self.outputs {
            old[node].output[slot] = tensor.clone();
        }
        let mut after: HashMap<usize, Vec<NodeProto>> = HashMap::new();
        let mut nodes = Vec::with_capacity(old.len() + self.added.len());
        for (place, node) in self.added {
            match place {
                Place::First => nodes.push(node),
                Place::After(i) => after.entry(i).or_default().push(node),
            }
        }
        for (i, node) in old.into_iter().enumerate() {
            if !self.removed.contains(&i) {
                nodes.push(node);
            }
            nodes.extend(after.remove(&i).into_iter().flatten());
        }
        graph.node = nodes;
        graph.initializer.extend(self.initializers);
        remove_unused_initializers(graph);
        check_well_formed(graph)
    }
}

/// Drops initializers no node reads any more (the float weights that int8
/// ones replaced), and their graph-input entries, which older exporters
/// list: left there, they would become required inputs.
fn remove_unused_initializers(graph: &mut GraphProto) {
    let read: HashSet<String> = graph
        .node
        .iter()
        .flat_map(|n| n.input.iter().cloned())
        .chain(graph.output.iter().map(|o| o.name.clone()))
        .collect();
    let removed: HashSet<String> =
        graph.initializer.iter().filter(|t| !read.contains(&t.name)).map(|t| t.name.clone()).collect();
    graph.initializer.retain(|t| !removed.contains(&t.name));
    graph.input.retain(|i| !removed.contains(&i.name));
}

/// What every patch must leave: nodes in topological order, each tensor
/// assigned once, node names unique, every graph output written.
pub fn check_well_formed(graph: &GraphProto) -> Result<(), Malformed> {
    let mut defined: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    defined.extend(graph.input.iter().map(|i| i.name.as_str()));
    defined.insert("");
    let mut node_names = HashSet::new();
    for (i, node) in graph.node.iter().enumerate() {
        let malformed = |problem: String| Malformed { node: node_name(node, i), problem };
        if !node.name.is_empty() && !node_names.insert(node.name.as_str()) {
            return Err(malformed("its name is used by an earlier node".into()));
        }
        if let Some(missing) = node.input.iter().find(|input| !defined.contains(input.as_str())) {
            return Err(malformed(format!("it reads `{missing}` before anything writes it")));
        }
        for output in &node.output {
            if !defined.insert(output.as_str()) {
                return Err(malformed(format!("it writes `{output}`, which something else writes too")));
            }
        }
    }
    if let Some(output) = graph.output.iter().find(|o| !defined.contains(o.name.as_str())) {
        return Err(Malformed { node: "(graph outputs)".into(), problem: format!("nothing writes `{}`", output.name) });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(op: &str, inputs: &[&str], output: &str) -> NodeProto {
        NodeProto {
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            ..Default::default()
        }
    }

    fn graph() -> GraphProto {
        GraphProto {
            node: vec![node("Relu", &["x"], "a"), node("Neg", &["a"], "b")],
            input: vec![candle_onnx::onnx::ValueInfoProto { name: "x".into(), ..Default::default() }],
            output: vec![candle_onnx::onnx::ValueInfoProto { name: "b".into(), ..Default::default() }],
            ..Default::default()
        }
    }

    #[test]
    fn a_patch_inserts_after_producers_and_rewires_in_one_step() {
        let mut g = graph();
        let mut names = Names::of(&g);
        let mut patch = Patch::default();
        let copy = names.fresh("a");
        assert_eq!(copy, "a_1");
        patch.add_node(Place::After(0), node("Identity", &["a"], &copy));
        patch.set_input(1, 0, copy.clone());
        patch.apply(&mut g).unwrap();
        let order: Vec<&str> = g.node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(order, ["Relu", "Identity", "Neg"]);
        assert_eq!(g.node[2].input, ["a_1"]);
    }

    #[test]
    fn a_patch_that_breaks_the_graph_is_caught_at_apply() {
        let mut g = graph();
        let mut patch = Patch::default();
        patch.add_node(Place::First, node("Neg", &["a"], "early"));
        let error = patch.apply(&mut g).unwrap_err();
        assert!(error.problem.contains("reads `a` before anything writes it"), "{error}");

        let mut g = graph();
        let mut patch = Patch::default();
        patch.remove_node(1);
        let error = patch.apply(&mut g).unwrap_err();
        assert!(error.problem.contains("nothing writes `b`"), "{error}");
    }
}
