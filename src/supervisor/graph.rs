//! The dependency graph of a process table (`depends_on`): validation (unknown ids, cycles), start layers
//! and the reverse order for stopping.
//!
//! A *layer* is a set of processes whose dependencies are all in earlier layers: the processes of one layer
//! can start in parallel once the previous layers are running, and stop in parallel once the later layers
//! have stopped. Within a layer, ids keep the order in which they were given (the table's order).

use std::collections::{BTreeSet, HashMap};

use super::definition::{ProcessDefinition, ProcessTable};
use super::error::DefinitionError;

/// Why a set of dependencies cannot be ordered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GraphError {
    /// `id` depends on a process that is not defined.
    #[error("{id} depends on {dependency}, which is not defined")]
    Unknown {
        /// The process that depends.
        id: String,
        /// The undefined process it depends on.
        dependency: String,
    },
    /// The ids on a cycle, in dependency order; the first one is repeated at the end.
    #[error("dependency cycle: {}", .0.join(" → "))]
    Cycle(Vec<String>),
}

/// Processes and their dependencies, validated: every dependency is a node and there is no cycle.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DependencyGraph {
    layers: Vec<Vec<String>>,
}

impl DependencyGraph {
    /// Builds and validates the graph of `nodes` (`(id, depends_on)`, in table order).
    ///
    /// # Errors
    /// [`GraphError::Unknown`] for a dependency that is not a node; [`GraphError::Cycle`] naming the ids on a
    /// cycle (a process depending on itself is a cycle of one).
    pub fn new(nodes: &[(String, Vec<String>)]) -> Result<Self, GraphError> {
        Self::build(nodes, false)
    }

    /// Like [`DependencyGraph::new`], but dependencies that are not nodes are ignored instead of refused: the
    /// live set of processes (where a dependency may be defined later) is ordered with what is known.
    ///
    /// # Errors
    /// [`GraphError::Cycle`].
    pub fn lenient(nodes: &[(String, Vec<String>)]) -> Result<Self, GraphError> {
        Self::build(nodes, true)
    }

    fn build(nodes: &[(String, Vec<String>)], lenient: bool) -> Result<Self, GraphError> {
        let index: HashMap<&str, usize> = nodes.iter().enumerate().map(|(i, (id, _))| (id.as_str(), i)).collect();
        // deps[i]: indices i depends on (deduplicated).
        let mut deps: Vec<BTreeSet<usize>> = Vec::with_capacity(nodes.len());
        for (id, depends_on) in nodes {
            let mut set = BTreeSet::new();
            for d in depends_on {
                match index.get(d.as_str()) {
                    Some(&j) => {
                        set.insert(j);
                    }
                    None if lenient => {}
                    None => {
                        return Err(GraphError::Unknown {
                            id: id.clone(),
                            dependency: d.clone(),
                        })
                    }
                }
            }
            deps.push(set);
        }
        // Kahn's algorithm, one layer at a time.
        let mut layer_of: Vec<Option<usize>> = vec![None; nodes.len()];
        let mut layers: Vec<Vec<String>> = Vec::new();
        let mut placed = 0;
        while placed < nodes.len() {
            let current = layers.len();
            let layer: Vec<usize> = (0..nodes.len())
                .filter(|&i| layer_of[i].is_none() && deps[i].iter().all(|&j| layer_of[j].is_some_and(|l| l < current)))
                .collect();
            if layer.is_empty() {
                let rest: Vec<usize> = (0..nodes.len()).filter(|&i| layer_of[i].is_none()).collect();
                return Err(GraphError::Cycle(find_cycle(nodes, &deps, &rest)));
            }
            for &i in &layer {
                layer_of[i] = Some(current);
            }
            placed += layer.len();
            layers.push(layer.into_iter().map(|i| nodes[i].0.clone()).collect());
        }
        Ok(DependencyGraph { layers })
    }

    /// The graph of a set of definitions, ignoring dependencies that are not among them.
    ///
    /// # Errors
    /// [`GraphError::Cycle`].
    pub fn of_definitions<'a>(defs: impl IntoIterator<Item = &'a ProcessDefinition>) -> Result<Self, GraphError> {
        let nodes: Vec<(String, Vec<String>)> =
            defs.into_iter().map(|d| (d.id.clone(), d.depends_on.clone())).collect();
        Self::lenient(&nodes)
    }

    /// Start layers: layer 0 depends on nothing, each later layer only on earlier ones.
    pub fn layers(&self) -> &[Vec<String>] {
        &self.layers
    }

    /// Every id, dependencies before dependents.
    pub fn start_order(&self) -> Vec<String> {
        self.layers.iter().flatten().cloned().collect()
    }

    /// Stop layers: the start layers reversed (dependents stop before what they depend on).
    pub fn stop_order(&self) -> Vec<Vec<String>> {
        self.layers.iter().rev().cloned().collect()
    }
}

/// One cycle among `rest` (nodes that could not be layered: each has a dependency in `rest`), as ids with the
/// first repeated at the end. Walks dependencies from the first such node until a node repeats.
fn find_cycle(nodes: &[(String, Vec<String>)], deps: &[BTreeSet<usize>], rest: &[usize]) -> Vec<String> {
    let in_rest: BTreeSet<usize> = rest.iter().copied().collect();
    let mut path: Vec<usize> = Vec::new();
    let mut at = rest[0];
    loop {
        if let Some(pos) = path.iter().position(|&p| p == at) {
            let mut ids: Vec<String> = path[pos..].iter().map(|&i| nodes[i].0.clone()).collect();
            ids.push(nodes[at].0.clone());
            return ids;
        }
        path.push(at);
        // Every unplaced node has an unplaced dependency, so the walk never ends outside `rest`.
        match deps[at].iter().find(|j| in_rest.contains(j)) {
            Some(&next) => at = next,
            None => return path.iter().map(|&i| nodes[i].0.clone()).collect(),
        }
    }
}

impl ProcessTable {
    /// The dependency graph of the table's processes: the core services and the `devices` entries (by id).
    ///
    /// # Errors
    /// [`DefinitionError::Invalid`] naming the file, the entry's `depends_on` and the unknown id or the ids
    /// on a cycle.
    pub fn dependency_graph(&self) -> Result<DependencyGraph, DefinitionError> {
        let nodes = self.dependency_nodes()?;
        DependencyGraph::new(&nodes).map_err(|e| {
            let key = match &e {
                GraphError::Unknown { id, .. } => format!("{}.depends_on", self.entry_key(id)),
                GraphError::Cycle(ids) => format!("{}.depends_on", self.entry_key(&ids[0])),
            };
            DefinitionError::Invalid {
                origin: self.origin().to_owned(),
                key,
                message: e.to_string(),
            }
        })
    }

    /// Start layers of the table's processes (see [`DependencyGraph::layers`]).
    ///
    /// # Errors
    /// As [`ProcessTable::dependency_graph`] (a loaded table has already passed it).
    pub fn start_layers(&self) -> Result<Vec<Vec<String>>, DefinitionError> {
        Ok(self.dependency_graph()?.layers().to_vec())
    }

    /// The order in which to stop the table's processes: layers, dependents first. Ids in one layer can be
    /// stopped in parallel; wait for a layer to be stopped before the next.
    ///
    /// # Errors
    /// As [`ProcessTable::dependency_graph`] (a loaded table has already passed it).
    pub fn stop_order(&self) -> Result<Vec<Vec<String>>, DefinitionError> {
        Ok(self.dependency_graph()?.stop_order())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(spec: &[(&str, &[&str])]) -> Vec<(String, Vec<String>)> {
        spec.iter()
            .map(|(id, deps)| ((*id).to_owned(), deps.iter().map(|d| (*d).to_owned()).collect()))
            .collect()
    }

    #[test]
    fn layers_put_independent_branches_together_and_keep_table_order() {
        let g = DependencyGraph::new(&nodes(&[
            ("cm", &["registry", "sm"]),
            ("sm", &["registry"]),
            ("logger", &[]),
            ("registry", &[]),
            ("hub", &["registry"]),
        ]))
        .unwrap();
        assert_eq!(g.layers(), &[vec!["logger", "registry"], vec!["sm", "hub"], vec!["cm"]]);
        assert_eq!(g.start_order(), vec!["logger", "registry", "sm", "hub", "cm"]);
        assert_eq!(
            g.stop_order(),
            vec![
                vec!["cm".to_owned()],
                vec!["sm".into(), "hub".into()],
                vec!["logger".into(), "registry".into()]
            ]
        );
    }

    #[test]
    fn an_unknown_dependency_is_refused_by_name() {
        let e = DependencyGraph::new(&nodes(&[("sm", &["registry"])])).unwrap_err();
        assert_eq!(
            e,
            GraphError::Unknown {
                id: "sm".into(),
                dependency: "registry".into()
            }
        );
        // The live form orders what it knows.
        let g = DependencyGraph::lenient(&nodes(&[("sm", &["registry"])])).unwrap();
        assert_eq!(g.start_order(), vec!["sm"]);
    }

    #[test]
    fn a_cycle_is_refused_with_its_ids() {
        let e = DependencyGraph::new(&nodes(&[
            ("registry", &[]),
            ("a", &["registry", "c"]),
            ("b", &["a"]),
            ("c", &["b"]),
            ("d", &["c"]),
        ]))
        .unwrap_err();
        let GraphError::Cycle(ids) = &e else { panic!("{e:?}") };
        assert_eq!(ids, &["a", "c", "b", "a"]);
        assert_eq!(e.to_string(), "dependency cycle: a → c → b → a");
        // The lenient form refuses cycles too.
        assert!(matches!(
            DependencyGraph::lenient(&nodes(&[("x", &["y"]), ("y", &["x"])])),
            Err(GraphError::Cycle(_))
        ));
    }

    #[test]
    fn a_self_dependency_is_a_cycle_of_one() {
        let e = DependencyGraph::new(&nodes(&[("a", &["a"])])).unwrap_err();
        assert_eq!(e, GraphError::Cycle(vec!["a".into(), "a".into()]));
    }

    #[test]
    fn duplicate_dependencies_count_once() {
        let g = DependencyGraph::new(&nodes(&[("a", &[]), ("b", &["a", "a"])])).unwrap();
        assert_eq!(g.layers(), &[vec!["a"], vec!["b"]]);
    }

    #[test]
    fn the_empty_graph_has_no_layers() {
        let g = DependencyGraph::new(&[]).unwrap();
        assert!(g.layers().is_empty());
        assert!(g.stop_order().is_empty());
    }
}
