//! The host-side graph: edgetune ops over tensors, between import and packing.
//!
//! Lowering builds it from tract's typed model, passes rewrite it (folding, fusion, compression),
//! the planner places its activations and the packer writes it as `.etm`.

use edgetune_core::{DType, Encoding, Op, Shape};

/// Index of a tensor in [`Graph::tensors`].
pub type TensorId = usize;

/// Plain constant values.
#[derive(Debug, Clone, PartialEq)]
pub enum ConstData {
    /// f32 values.
    F32(Vec<f32>),
    /// i64 values.
    I64(Vec<i64>),
    /// i32 values.
    I32(Vec<i32>),
    /// Bytes: bools (0/1), u8 or i8 (two's complement).
    Bytes(Vec<u8>),
}

impl ConstData {
    /// Element count.
    pub fn len(&self) -> usize {
        match self {
            ConstData::F32(v) => v.len(),
            ConstData::I64(v) => v.len(),
            ConstData::I32(v) => v.len(),
            ConstData::Bytes(v) => v.len(),
        }
    }

    /// The f32 values, if this is f32 data.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match self {
            ConstData::F32(v) => Some(v),
            _ => None,
        }
    }

    /// Little-endian bytes of the plain layout.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        match self {
            ConstData::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ConstData::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ConstData::I32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ConstData::Bytes(v) => v.clone(),
        }
    }

    /// Elements reordered by `perm` over `dims` (output axis i = input axis perm[i]).
    pub fn permuted(&self, dims: &[usize], perm: &[usize]) -> ConstData {
        fn go<T: Copy>(v: &[T], dims: &[usize], perm: &[usize]) -> Vec<T> {
            let r = dims.len();
            let mut st = vec![1usize; r];
            for i in (0..r.saturating_sub(1)).rev() {
                st[i] = st[i + 1] * dims[i + 1];
            }
            let odims: Vec<usize> = perm.iter().map(|&p| dims[p]).collect();
            let ost: Vec<usize> = perm.iter().map(|&p| st[p]).collect();
            let mut out = Vec::with_capacity(v.len());
            let mut idx = vec![0usize; r];
            for _ in 0..v.len() {
                out.push(v[idx.iter().zip(&ost).map(|(i, s)| i * s).sum::<usize>()]);
                for d in (0..r).rev() {
                    idx[d] += 1;
                    if idx[d] < odims[d] {
                        break;
                    }
                    idx[d] = 0;
                }
            }
            out
        }
        match self {
            ConstData::F32(v) => ConstData::F32(go(v, dims, perm)),
            ConstData::I64(v) => ConstData::I64(go(v, dims, perm)),
            ConstData::I32(v) => ConstData::I32(go(v, dims, perm)),
            ConstData::Bytes(v) => ConstData::Bytes(go(v, dims, perm)),
        }
    }
}

/// Bytes and layout a constant is written with.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// The encoding.
    pub encoding: Encoding,
    /// The encoded bytes.
    pub bytes: Vec<u8>,
    /// Encoding parameters stored with the tensor.
    pub params: [u32; 4],
}

/// A tensor of the graph.
#[derive(Debug, Clone)]
pub struct Tensor {
    /// Name from the source model.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Logical shape.
    pub shape: Vec<usize>,
    /// Constant values; `None` for activations.
    pub value: Option<ConstData>,
    /// Requested storage layout for a constant (packing turns plain values into it).
    pub encoding: Encoding,
    /// Pre-encoded bytes (compressed weights); overrides `encoding` when set.
    pub encoded: Option<Encoded>,
    /// For an activation that reuses another's bytes under this shape.
    pub alias_of: Option<TensorId>,
}

impl Tensor {
    /// Element count.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The shape in the file's form.
    pub fn core_shape(&self) -> Shape {
        Shape::new(&self.shape).expect("rank checked at creation")
    }

    /// True for constants.
    pub fn is_const(&self) -> bool {
        self.value.is_some()
    }
}

/// An op application.
#[derive(Debug, Clone)]
pub struct Node {
    /// Source node name.
    pub name: String,
    /// The op.
    pub op: Op,
    /// Input tensors.
    pub inputs: Vec<TensorId>,
    /// The output tensor.
    pub output: TensorId,
}

/// A graph of edgetune ops in execution order.
#[derive(Debug, Clone, Default)]
pub struct Graph {
    /// All tensors.
    pub tensors: Vec<Tensor>,
    /// Nodes in execution order.
    pub nodes: Vec<Node>,
    /// Graph inputs.
    pub inputs: Vec<(String, TensorId)>,
    /// Graph outputs.
    pub outputs: Vec<(String, TensorId)>,
    /// Metadata to store in the file.
    pub meta: Vec<(String, String)>,
}

impl Graph {
    /// Adds an activation tensor.
    pub fn activation(
        &mut self,
        name: impl Into<String>,
        dtype: DType,
        shape: Vec<usize>,
    ) -> TensorId {
        self.tensors.push(Tensor {
            name: name.into(),
            dtype,
            shape,
            value: None,
            encoding: Encoding::Plain,
            encoded: None,
            alias_of: None,
        });
        self.tensors.len() - 1
    }

    /// Adds a constant tensor.
    pub fn constant(
        &mut self,
        name: impl Into<String>,
        dtype: DType,
        shape: Vec<usize>,
        value: ConstData,
    ) -> TensorId {
        debug_assert_eq!(value.len(), shape.iter().product::<usize>());
        self.tensors.push(Tensor {
            name: name.into(),
            dtype,
            shape,
            value: Some(value),
            encoding: Encoding::Plain,
            encoded: None,
            alias_of: None,
        });
        self.tensors.len() - 1
    }

    /// A view of `src` with another shape of the same size: a free alias for activations, a new
    /// constant for constants. Returns `src` itself when the shape is unchanged.
    pub fn reshaped(&mut self, src: TensorId, shape: Vec<usize>) -> TensorId {
        let t = &self.tensors[src];
        debug_assert_eq!(
            t.numel(),
            shape.iter().product::<usize>(),
            "reshape of {}",
            t.name
        );
        if t.shape == shape {
            return src;
        }
        let name = format!("{}.view", t.name);
        let dtype = t.dtype;
        if let Some(v) = t.value.clone() {
            return self.constant(name, dtype, shape, v);
        }
        let root = t.alias_of.unwrap_or(src);
        let id = self.activation(name, dtype, shape);
        self.tensors[id].alias_of = Some(root);
        id
    }

    /// Appends a node writing a new activation of the given type and shape; returns it.
    pub fn push(
        &mut self,
        name: impl Into<String>,
        op: Op,
        inputs: Vec<TensorId>,
        dtype: DType,
        shape: Vec<usize>,
    ) -> TensorId {
        let name = name.into();
        let out = self.activation(name.clone(), dtype, shape);
        self.nodes.push(Node {
            name,
            op,
            inputs,
            output: out,
        });
        out
    }

    /// Nodes reading each tensor (through aliases too), as node indices.
    pub fn consumers(&self) -> Vec<Vec<usize>> {
        let mut c = vec![Vec::new(); self.tensors.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            for &t in &n.inputs {
                c[t].push(i);
            }
        }
        c
    }

    /// Aliases whose root is each tensor.
    pub fn aliases(&self) -> Vec<Vec<TensorId>> {
        let mut a = vec![Vec::new(); self.tensors.len()];
        for (i, t) in self.tensors.iter().enumerate() {
            if let Some(r) = t.alias_of {
                a[r].push(i);
            }
        }
        a
    }

    /// True when `t` (or an alias of it) is a graph output.
    pub fn is_output(&self, t: TensorId) -> bool {
        self.outputs
            .iter()
            .any(|&(_, o)| o == t || self.tensors[o].alias_of == Some(t))
    }

    /// Index of the node producing `t`, if any.
    pub fn producer(&self, t: TensorId) -> Option<usize> {
        self.nodes.iter().position(|n| n.output == t)
    }

    /// Replaces every read of `from` by `to` (node inputs and graph outputs).
    pub fn replace_uses(&mut self, from: TensorId, to: TensorId) {
        for n in &mut self.nodes {
            for i in &mut n.inputs {
                if *i == from {
                    *i = to;
                }
            }
        }
        for (_, o) in &mut self.outputs {
            if *o == from {
                *o = to;
            }
        }
        // Aliases of `from` become aliases of `to`'s root.
        let root = self.tensors[to].alias_of.unwrap_or(to);
        for t in &mut self.tensors {
            if t.alias_of == Some(from) {
                t.alias_of = Some(root);
            }
        }
    }

    /// Removes nodes whose output nobody reads, repeatedly.
    pub fn remove_dead_nodes(&mut self) {
        loop {
            let consumers = self.consumers();
            let aliases = self.aliases();
            let used = |t: TensorId| {
                !consumers[t].is_empty()
                    || self.is_output(t)
                    || aliases[t]
                        .iter()
                        .any(|&a| !consumers[a].is_empty() || self.is_output(a))
            };
            let before = self.nodes.len();
            let keep: Vec<bool> = self.nodes.iter().map(|n| used(n.output)).collect();
            let mut k = keep.iter();
            self.nodes.retain(|_| *k.next().unwrap());
            if self.nodes.len() == before {
                break;
            }
        }
    }

    /// Number of nodes reading `t` or an alias of it.
    pub fn readers(&self, t: TensorId) -> usize {
        let consumers = self.consumers();
        let aliases = self.aliases();
        consumers[t].len()
            + aliases[t]
                .iter()
                .map(|&a| consumers[a].len())
                .sum::<usize>()
    }
}

impl Graph {
    /// Rebuilds the graph of a `.etm` model (so an imported model can be compressed again).
    /// Panel-packed weights come back as plain values; already compressed weights keep their
    /// bytes (and their decoded values, for reference).
    pub fn from_model(m: &edgetune_core::Model<'_>) -> anyhow::Result<Graph> {
        use edgetune_core::{Encoding, Storage};
        let mut g = Graph::default();
        for id in 0..m.tensor_count() {
            let t = m.tensor(id);
            let shape: Vec<usize> = t.meta.shape.dims().iter().map(|&d| d as usize).collect();
            match t.meta.storage {
                Storage::Arena => {
                    let a = g.activation(t.name, t.meta.dtype, shape);
                    g.tensors[a].alias_of = t.alias_of.map(|r| r as usize);
                }
                Storage::Const => {
                    let bytes = m.const_bytes(id);
                    let (n, k) = (
                        shape.first().copied().unwrap_or(1),
                        shape.get(1).copied().unwrap_or(1),
                    );
                    let value = match (t.meta.encoding, t.meta.dtype) {
                        (Encoding::Plain, DType::F32) => ConstData::F32(
                            bytes
                                .chunks_exact(4)
                                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                                .collect(),
                        ),
                        (Encoding::Plain, DType::I64) => ConstData::I64(
                            bytes
                                .chunks_exact(8)
                                .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                                .collect(),
                        ),
                        (Encoding::Plain, DType::I32) => ConstData::I32(
                            bytes
                                .chunks_exact(4)
                                .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
                                .collect(),
                        ),
                        (Encoding::Plain, DType::F16) => {
                            anyhow::bail!("{}: f16 constants are not supported", t.name)
                        }
                        (Encoding::Plain, _) => ConstData::Bytes(bytes.to_vec()),
                        (Encoding::PanelF32, _) => {
                            let panel = edgetune_core::PANEL;
                            let f = |i: usize| {
                                f32::from_le_bytes(bytes[i * 4..i * 4 + 4].try_into().unwrap())
                            };
                            ConstData::F32(
                                (0..n * k)
                                    .map(|i| {
                                        f(((i / k / panel * k + i % k) * panel) + (i / k) % panel)
                                    })
                                    .collect(),
                            )
                        }
                        (e, _) => {
                            let enc = edgetune_quant::encode::Encoded {
                                encoding: e,
                                bytes: bytes.to_vec(),
                                params: t.params,
                            };
                            ConstData::F32(edgetune_quant::encode::decode(&enc, n, k)?)
                        }
                    };
                    let c = g.constant(t.name, t.meta.dtype, shape, value);
                    match t.meta.encoding {
                        Encoding::Plain => {}
                        Encoding::PanelF32 => g.tensors[c].encoding = Encoding::PanelF32,
                        e => {
                            g.tensors[c].encoded = Some(Encoded {
                                encoding: e,
                                bytes: bytes.to_vec(),
                                params: t.params,
                            })
                        }
                    }
                }
            }
        }
        for op in m.ops() {
            g.nodes.push(Node {
                name: op.name.to_string(),
                op: op.op,
                inputs: op.inputs().map(|i| i as usize).collect(),
                output: op.output(0) as usize,
            });
        }
        g.inputs = m
            .inputs()
            .map(|io| (io.name.to_string(), io.tensor as usize))
            .collect();
        g.outputs = m
            .outputs()
            .map(|io| (io.name.to_string(), io.tensor as usize))
            .collect();
        g.meta = m
            .meta_entries()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Ok(g)
    }
}
