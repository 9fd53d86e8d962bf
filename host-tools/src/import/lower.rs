//! Lowers tract's decluttered typed model to the edgetune graph.
//!
//! Each tract op maps to one or a few edgetune ops; reshapes become free aliases. Ops that cannot
//! be lowered are collected, so one error lists every unsupported node.

use std::collections::HashMap;

use anyhow::{anyhow, bail, Result};
use edgetune_core::ops::{Conv, Dense, MatMul, Pool};
use edgetune_core::{ActKind, Activation, BinaryKind, DType, Encoding, Op, ReduceKind, MAX_RANK};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops as tops;

use crate::ir::{ConstData, Graph, TensorId};

/// Choices the lowering makes that depend on the target.
#[derive(Debug, Clone, Copy)]
pub struct LowerOptions {
    /// Bytes an im2col tile may take in the arena (per convolution, while it runs).
    pub im2col_bytes: usize,
}

impl Default for LowerOptions {
    fn default() -> Self {
        LowerOptions {
            im2col_bytes: 64 * 1024,
        }
    }
}

/// A tract node we could not lower.
#[derive(Debug, Clone)]
pub struct Unsupported {
    /// Node name.
    pub node: String,
    /// tract's op name.
    pub op: String,
    /// Why.
    pub why: String,
}

/// Every unsupported node of a model.
#[derive(Debug)]
pub struct UnsupportedOps(pub Vec<Unsupported>);

impl std::fmt::Display for UnsupportedOps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} node(s) cannot be lowered to edgetune ops:",
            self.0.len()
        )?;
        for u in &self.0 {
            writeln!(f, "  - {} ({}): {}", u.node, u.op, u.why)?;
        }
        Ok(())
    }
}

impl std::error::Error for UnsupportedOps {}

struct Lower {
    g: Graph,
    map: HashMap<OutletId, TensorId>,
    opts: LowerOptions,
}

/// Lowers a typed (decluttered, concretely shaped) tract model.
pub fn lower(model: &TypedModel, opts: LowerOptions) -> Result<Graph> {
    let mut l = Lower {
        g: Graph::default(),
        map: HashMap::new(),
        opts,
    };
    let mut unsupported = Vec::new();
    for id in model.eval_order()? {
        let node = model.node(id);
        if let Err(e) = l.node(node) {
            unsupported.push(Unsupported {
                node: node.name.clone(),
                op: node.op.name().to_string(),
                why: format!("{e:#}"),
            });
        }
    }
    if !unsupported.is_empty() {
        return Err(UnsupportedOps(unsupported).into());
    }
    // Graph inputs in the file's declaration order, not evaluation order.
    let order: Vec<String> = model
        .input_outlets()?
        .iter()
        .map(|o| model.node(o.node).name.clone())
        .collect();
    l.g.inputs
        .sort_by_key(|(name, _)| order.iter().position(|n| n == name));
    for &o in model.output_outlets()? {
        let name = model
            .outlet_label(o)
            .map(|s| s.to_string())
            .unwrap_or_else(|| model.node(o.node).name.clone());
        let t = l.t(o)?;
        if l.g.tensors[t].is_const() {
            bail!("output {name} is a constant; nothing to run");
        }
        l.g.outputs.push((name, t));
    }
    Ok(l.g)
}

fn dtype_of(dt: DatumType) -> Result<DType> {
    Ok(match dt {
        DatumType::F32 => DType::F32,
        DatumType::I64 | DatumType::TDim => DType::I64,
        DatumType::I32 => DType::I32,
        DatumType::Bool => DType::Bool,
        DatumType::U8 => DType::U8,
        DatumType::I8 => DType::I8,
        other => bail!("element type {other:?} is not supported"),
    })
}

fn plain<T: Datum + Copy>(t: &Tensor) -> Result<Vec<T>> {
    Ok(t.to_plain_array_view::<T>()?.iter().copied().collect())
}

/// Converts a tract constant to plain data (f16/f64 become f32, TDim becomes i64).
pub fn const_data(t: &Tensor) -> Result<(DType, ConstData)> {
    Ok(match t.datum_type() {
        DatumType::F32 => (DType::F32, ConstData::F32(plain::<f32>(t)?)),
        DatumType::F16 | DatumType::F64 => (
            DType::F32,
            ConstData::F32(plain::<f32>(&*t.cast_to::<f32>()?)?),
        ),
        DatumType::I64 => (DType::I64, ConstData::I64(plain::<i64>(t)?)),
        DatumType::TDim | DatumType::I16 | DatumType::U16 | DatumType::U32 => (
            DType::I64,
            ConstData::I64(plain::<i64>(&*t.cast_to::<i64>()?)?),
        ),
        DatumType::I32 => (DType::I32, ConstData::I32(plain::<i32>(t)?)),
        DatumType::Bool => (
            DType::Bool,
            ConstData::Bytes(plain::<bool>(t)?.into_iter().map(|b| b as u8).collect()),
        ),
        DatumType::U8 => (DType::U8, ConstData::Bytes(plain::<u8>(t)?)),
        DatumType::I8 => (
            DType::I8,
            ConstData::Bytes(plain::<i8>(t)?.into_iter().map(|b| b as u8).collect()),
        ),
        other => bail!("constant of type {other:?} is not supported"),
    })
}

/// Role of an einsum axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// In both operands and the output.
    Batch,
    /// In the first operand and the output.
    M,
    /// In the second operand and the output.
    N,
    /// In both operands, summed.
    K,
}

impl Lower {
    fn t(&self, o: OutletId) -> Result<TensorId> {
        self.map
            .get(&o)
            .copied()
            .ok_or_else(|| anyhow!("input {o:?} was not lowered"))
    }

    fn out_shape(&self, node: &TypedNode, slot: usize) -> Result<Vec<usize>> {
        let f = &node.outputs[slot].fact;
        let s = f.shape.as_concrete().ok_or_else(|| {
            anyhow!(
                "symbolic output shape {:?}: give concrete input shapes",
                f.shape
            )
        })?;
        if s.len() > MAX_RANK {
            bail!("rank {} above {MAX_RANK}", s.len());
        }
        if s.contains(&0) {
            bail!("zero-sized tensor {:?}", s);
        }
        Ok(s.to_vec())
    }

    fn out_dtype(&self, node: &TypedNode) -> Result<DType> {
        dtype_of(node.outputs[0].fact.datum_type)
    }

    fn shape(&self, t: TensorId) -> Vec<usize> {
        self.g.tensors[t].shape.clone()
    }

    fn konst(&self, t: TensorId) -> Option<&ConstData> {
        self.g.tensors[t].value.as_ref()
    }

    fn scalar_f32(&self, t: TensorId) -> Option<f32> {
        match self.konst(t)? {
            ConstData::F32(v) if v.len() == 1 => Some(v[0]),
            _ => None,
        }
    }

    fn set(&mut self, node: &TypedNode, t: TensorId) {
        self.map.insert(OutletId::new(node.id, 0), t);
    }

    /// Output of a lowered op, aliased to tract's shape when the edgetune op produced another.
    fn finish(&mut self, node: &TypedNode, t: TensorId) -> Result<()> {
        let want = self.out_shape(node, 0)?;
        let t = self.g.reshaped(t, want);
        self.set(node, t);
        Ok(())
    }

    fn node(&mut self, node: &TypedNode) -> Result<()> {
        let op = &node.op;
        let inputs: Vec<OutletId> = node.inputs.clone();
        let name = node.name.clone();
        if op.downcast_ref::<tops::source::TypedSource>().is_some() {
            let dt = self.out_dtype(node)?;
            let t = self
                .g
                .activation(name.clone(), dt, self.out_shape(node, 0)?);
            self.g.inputs.push((name, t));
            self.set(node, t);
            return Ok(());
        }
        if let Some(k) = op.downcast_ref::<tops::konst::Const>() {
            let (dt, data) = const_data(k.val())?;
            let shape = k.val().shape().to_vec();
            let t = self.g.constant(name, dt, shape, data);
            self.set(node, t);
            return Ok(());
        }
        // A node whose output tract already knows as a constant (folded): store the value.
        if let Some(k) = node.outputs[0].fact.konst.clone() {
            if node.outputs.len() == 1 {
                let (dt, data) = const_data(&k)?;
                let t = self.g.constant(name, dt, k.shape().to_vec(), data);
                self.set(node, t);
                return Ok(());
            }
        }
        let ins: Vec<TensorId> = inputs.iter().map(|&o| self.t(o)).collect::<Result<_>>()?;
        if let Some(c) = op.downcast_ref::<tops::cnn::Conv>() {
            return self.conv(node, c, &ins);
        }
        if let Some(p) = op.downcast_ref::<tops::cnn::MaxPool>() {
            if p.with_index_outputs.is_some() {
                bail!("max pool with index outputs");
            }
            return self.pool(node, &p.pool_spec, true, false, ins[0]);
        }
        if let Some(p) = op.downcast_ref::<tops::cnn::SumPool>() {
            if !p.normalize {
                bail!("sum pooling without normalisation");
            }
            return self.pool(node, &p.pool_spec, false, p.count_include_pad, ins[0]);
        }
        if let Some(e) = op.downcast_ref::<tops::einsum::EinSum>() {
            if e.q_params.is_some() || ins.len() != 2 {
                bail!("quantized or non-binary einsum");
            }
            return self.einsum(node, e, ins[0], ins[1]);
        }
        if let Some(b) = op.downcast_ref::<tops::binary::TypedBinOp>() {
            return self.binary(node, b.0.name(), ins[0], ins[1]);
        }
        if let Some(e) = op.downcast_ref::<tops::element_wise::ElementWiseOp>() {
            return self.element_wise(node, e, ins[0]);
        }
        if let Some(r) = op.downcast_ref::<tops::nn::Reduce>() {
            return self.reduce(node, r, ins[0]);
        }
        if let Some(a) = op.downcast_ref::<tops::change_axes::AxisOp>() {
            return match a {
                tops::change_axes::AxisOp::Move(from, to) => {
                    let r = self.shape(ins[0]).len();
                    let mut perm: Vec<usize> = (0..r).collect();
                    let ax = perm.remove(*from);
                    perm.insert(*to, ax);
                    let t = self.transpose(&name, ins[0], &perm);
                    self.finish(node, t)
                }
                _ => {
                    let t = ins[0];
                    self.finish(node, t)
                }
            };
        }
        if let Some(s) = op.downcast_ref::<tops::nn::Softmax>() {
            if s.axes.len() != 1 || s.quant_output_dt.is_some() {
                bail!("softmax over several axes or quantized");
            }
            let y = self.g.push(
                &name,
                Op::Softmax {
                    axis: s.axes[0] as u32,
                },
                vec![ins[0]],
                DType::F32,
                self.out_shape(node, 0)?,
            );
            let y = match s.kind {
                tops::nn::SoftmaxKind::Softmax => y,
                tops::nn::SoftmaxKind::LogSoftmax => self.g.push(
                    format!("{name}.log"),
                    Op::Unary(Activation::plain(ActKind::Log)),
                    vec![y],
                    DType::F32,
                    self.out_shape(node, 0)?,
                ),
            };
            self.set(node, y);
            return Ok(());
        }
        if let Some(r) = op.downcast_ref::<tops::nn::RmsNorm>() {
            let eps = r.eps.cast_to_scalar::<f32>()?;
            let y = self.g.push(
                &name,
                Op::LayerNorm {
                    axis: r.axis as u32,
                    eps,
                    rms: true,
                },
                vec![ins[0]],
                DType::F32,
                self.out_shape(node, 0)?,
            );
            self.set(node, y);
            return Ok(());
        }
        if let Some(gt) = op.downcast_ref::<tops::array::Gather>() {
            let dt = self.out_dtype(node)?;
            let y = self.g.push(
                &name,
                Op::Gather {
                    axis: gt.axis as u32,
                },
                vec![ins[0], ins[1]],
                dt,
                self.out_shape(node, 0)?,
            );
            self.set(node, y);
            return Ok(());
        }
        if op.downcast_ref::<tops::logic::Iff>().is_some() {
            let dt = self.out_dtype(node)?;
            let y = self
                .g
                .push(&name, Op::Where, ins.clone(), dt, self.out_shape(node, 0)?);
            self.set(node, y);
            return Ok(());
        }
        if op.downcast_ref::<tops::cast::Cast>().is_some() {
            let dt = self.out_dtype(node)?;
            let y = if self.g.tensors[ins[0]].dtype == dt {
                ins[0]
            } else {
                self.g
                    .push(&name, Op::Cast, vec![ins[0]], dt, self.out_shape(node, 0)?)
            };
            self.set(node, y);
            return Ok(());
        }
        if let Some(c) = op.downcast_ref::<tops::array::TypedConcat>() {
            let dt = self.out_dtype(node)?;
            let y = self.g.push(
                &name,
                Op::Concat {
                    axis: c.axis as u32,
                },
                ins.clone(),
                dt,
                self.out_shape(node, 0)?,
            );
            self.set(node, y);
            return Ok(());
        }
        if let Some(s) = op.downcast_ref::<tops::array::Slice>() {
            let r = self.shape(ins[0]).len();
            let start = s.start.to_i64()?;
            let mut starts = [0i32; MAX_RANK];
            let mut steps = [1i32; MAX_RANK];
            starts[s.axis] = i32::try_from(start)?;
            steps[..r].iter_mut().for_each(|v| *v = 1);
            let dt = self.out_dtype(node)?;
            let y = self.g.push(
                &name,
                Op::Slice { starts, steps },
                vec![ins[0]],
                dt,
                self.out_shape(node, 0)?,
            );
            self.set(node, y);
            return Ok(());
        }
        if op.downcast_ref::<tops::array::MultiBroadcastTo>().is_some() {
            let dt = self.out_dtype(node)?;
            let y = self.g.push(
                &name,
                Op::Expand,
                vec![ins[0]],
                dt,
                self.out_shape(node, 0)?,
            );
            self.set(node, y);
            return Ok(());
        }
        if let Some(p) = op.downcast_ref::<tops::array::Pad>() {
            return self.pad(node, p, ins[0]);
        }
        if op.name() == "Identity" {
            self.set(node, ins[0]);
            return Ok(());
        }
        bail!("no edgetune lowering for this op")
    }

    fn transpose(&mut self, name: &str, x: TensorId, perm: &[usize]) -> TensorId {
        if perm.iter().enumerate().all(|(i, &p)| i == p) {
            return x;
        }
        let xs = self.shape(x);
        let ys: Vec<usize> = perm.iter().map(|&p| xs[p]).collect();
        if let Some(v) = self.konst(x).cloned() {
            let dt = self.g.tensors[x].dtype;
            let name = format!("{name}.transposed");
            return self.g.constant(name, dt, ys, v.permuted(&xs, perm));
        }
        // Moving only size-1 axes changes no bytes: an alias does.
        let moved: Vec<usize> = perm.iter().copied().filter(|&p| xs[p] != 1).collect();
        if moved.windows(2).all(|w| w[0] < w[1]) {
            return self.g.reshaped(x, ys);
        }
        let mut p = [0u8; MAX_RANK];
        for (o, &v) in p.iter_mut().zip(perm) {
            *o = v as u8;
        }
        let dt = self.g.tensors[x].dtype;
        self.g.push(
            format!("{name}.transpose"),
            Op::Transpose { perm: p },
            vec![x],
            dt,
            ys,
        )
    }

    fn conv(&mut self, node: &TypedNode, c: &tops::cnn::Conv, ins: &[TensorId]) -> Result<()> {
        use tops::nn::DataFormat;
        if c.q_params.is_some() {
            bail!("quantized convolution");
        }
        let spec = &c.pool_spec;
        let x = ins[0];
        let xs = self.shape(x);
        let (batched, spatial) = match spec.data_format {
            DataFormat::NCHW => (true, xs.len() - 2),
            DataFormat::CHW => (false, xs.len() - 1),
            f => bail!("convolution data format {f:?}"),
        };
        if spatial == 0 || spatial > 2 {
            bail!("{spatial}-D convolution");
        }
        let w = ins[1];
        let wv = self
            .konst(w)
            .cloned()
            .ok_or_else(|| anyhow!("convolution weights are not constant"))?;
        let ConstData::F32(wv) = wv else {
            bail!("convolution weights are not f32")
        };
        let ws = self.shape(w);
        let group = c.group;
        // Weights to OIHW.
        let wv = match c.kernel_fmt {
            tops::cnn::KernelFormat::OIHW => wv,
            tops::cnn::KernelFormat::HWIO => {
                let r = ws.len();
                let mut perm = vec![r - 1, r - 2];
                perm.extend(0..r - 2);
                match ConstData::F32(wv).permuted(&ws, &perm) {
                    ConstData::F32(v) => v,
                    _ => unreachable!(),
                }
            }
            tops::cnn::KernelFormat::OHWI => {
                let r = ws.len();
                let mut perm = vec![0, r - 1];
                perm.extend(1..r - 1);
                match ConstData::F32(wv).permuted(&ws, &perm) {
                    ConstData::F32(v) => v,
                    _ => unreachable!(),
                }
            }
        };
        let cout = spec.output_channels;
        let cin = spec.input_channels;
        let k_per_out = wv.len() / cout;
        // Geometry as 2-D: a 1-D convolution is one of height 1.
        let kshape: Vec<usize> = spec.kernel_shape.to_vec();
        let pad2 = |v: &[usize]| -> [u32; 2] {
            if v.len() == 1 {
                [1, v[0] as u32]
            } else {
                [v[0] as u32, v[1] as u32]
            }
        };
        let kernel = pad2(&kshape);
        let stride = pad2(
            &spec
                .strides
                .clone()
                .map(|s| s.to_vec())
                .unwrap_or(vec![1; spatial]),
        );
        let dilation = pad2(
            &spec
                .dilations
                .clone()
                .map(|s| s.to_vec())
                .unwrap_or(vec![1; spatial]),
        );
        let in_hw: Vec<usize> = xs[xs.len() - spatial..].to_vec();
        let (before, after) = padding(
            &spec.padding,
            &in_hw,
            &kshape,
            &spec
                .strides
                .clone()
                .map(|s| s.to_vec())
                .unwrap_or(vec![1; spatial]),
            &spec
                .dilations
                .clone()
                .map(|s| s.to_vec())
                .unwrap_or(vec![1; spatial]),
        )?;
        let pads = if spatial == 1 {
            [0, before[0] as u32, 0, after[0] as u32]
        } else {
            [
                before[0] as u32,
                before[1] as u32,
                after[0] as u32,
                after[1] as u32,
            ]
        };
        let n = if batched { xs[0] } else { 1 };
        let (h, wd) = if spatial == 1 {
            (1, in_hw[0])
        } else {
            (in_hw[0], in_hw[1])
        };
        let x4 = self.g.reshaped(x, vec![n, cin, h, wd]);
        let ys = self.out_shape(node, 0)?;
        let out_hw: Vec<usize> = ys[ys.len() - spatial..].to_vec();
        let (ho, wo) = if spatial == 1 {
            (1, out_hw[0])
        } else {
            (out_hw[0], out_hw[1])
        };
        let depthwise = group > 1 && group == cin && cout == cin;
        let pointwise = kernel == [1, 1] && stride == [1, 1] && pads == [0; 4];
        let col_tile = if pointwise || depthwise || group > 1 {
            0
        } else {
            let k = k_per_out;
            ((self.opts.im2col_bytes / (4 * k)).max(1)).min(ho * wo) as u32
        };
        let col_tile = if group > 1 && !depthwise {
            // Grouped convolutions run the direct kernel over plain weights.
            0
        } else {
            col_tile
        };
        let wt = self.g.constant(
            format!("{}.weight", node.name),
            DType::F32,
            vec![cout, k_per_out],
            ConstData::F32(wv),
        );
        if group == 1 {
            self.g.tensors[wt].encoding = Encoding::PanelF32;
        }
        let mut conv_ins = vec![x4, wt];
        if let Some(&b) = ins.get(2) {
            let bv = self
                .konst(b)
                .cloned()
                .ok_or_else(|| anyhow!("convolution bias is not constant"))?;
            let ConstData::F32(bv) = bv else {
                bail!("convolution bias is not f32")
            };
            let bv = if bv.len() == 1 { vec![bv[0]; cout] } else { bv };
            if bv.len() != cout {
                bail!("bias of {} values for {cout} channels", bv.len());
            }
            conv_ins.push(self.g.constant(
                format!("{}.bias", node.name),
                DType::F32,
                vec![cout],
                ConstData::F32(bv),
            ));
        }
        let op = Op::Conv(Conv {
            kernel,
            stride,
            pads,
            dilation,
            groups: group as u32,
            act: Activation::NONE,
            col_tile,
        });
        let y = self
            .g
            .push(&node.name, op, conv_ins, DType::F32, vec![n, cout, ho, wo]);
        self.finish(node, y)
    }

    fn pool(
        &mut self,
        node: &TypedNode,
        spec: &tops::cnn::PoolSpec,
        max: bool,
        count_include_pad: bool,
        x: TensorId,
    ) -> Result<()> {
        use tops::nn::DataFormat;
        let xs = self.shape(x);
        let spatial = match spec.data_format {
            DataFormat::NCHW => xs.len() - 2,
            DataFormat::CHW => xs.len() - 1,
            f => bail!("pooling data format {f:?}"),
        };
        if spatial == 0 || spatial > 2 {
            bail!("{spatial}-D pooling");
        }
        let ones = vec![1; spatial];
        let strides = spec
            .strides
            .clone()
            .map(|s| s.to_vec())
            .unwrap_or(ones.clone());
        let dil = spec.dilations.clone().map(|s| s.to_vec()).unwrap_or(ones);
        if dil.iter().any(|&d| d != 1) {
            bail!("dilated pooling");
        }
        let kshape = spec.kernel_shape.to_vec();
        let in_hw: Vec<usize> = xs[xs.len() - spatial..].to_vec();
        let (before, after) = padding(&spec.padding, &in_hw, &kshape, &strides, &dil)?;
        let two = |v: &[usize]| -> [u32; 2] {
            if v.len() == 1 {
                [1, v[0] as u32]
            } else {
                [v[0] as u32, v[1] as u32]
            }
        };
        let pads = if spatial == 1 {
            [0, before[0] as u32, 0, after[0] as u32]
        } else {
            [
                before[0] as u32,
                before[1] as u32,
                after[0] as u32,
                after[1] as u32,
            ]
        };
        let planes: usize = xs[..xs.len() - spatial].iter().product();
        let (h, w) = if spatial == 1 {
            (1, in_hw[0])
        } else {
            (in_hw[0], in_hw[1])
        };
        let x4 = self.g.reshaped(x, vec![1, planes, h, w]);
        let ys = self.out_shape(node, 0)?;
        let out_hw: Vec<usize> = ys[ys.len() - spatial..].to_vec();
        let (ho, wo) = if spatial == 1 {
            (1, out_hw[0])
        } else {
            (out_hw[0], out_hw[1])
        };
        let op = Op::Pool(Pool {
            max,
            kernel: two(&kshape),
            stride: two(&strides),
            pads,
            count_include_pad,
        });
        let y = self.g.push(
            &node.name,
            op,
            vec![x4],
            DType::F32,
            vec![1, planes, ho, wo],
        );
        self.finish(node, y)
    }

    fn binary(&mut self, node: &TypedNode, op_name: &str, a: TensorId, b: TensorId) -> Result<()> {
        let kind = match op_name {
            "Add" => BinaryKind::Add,
            "Sub" => BinaryKind::Sub,
            "Mul" => BinaryKind::Mul,
            "Div" => BinaryKind::Div,
            "Pow" => BinaryKind::Pow,
            "Min" => BinaryKind::Min,
            "Max" => BinaryKind::Max,
            "Equals" | "Eq" => BinaryKind::Equal,
            "Less" => BinaryKind::Less,
            "Greater" => BinaryKind::Greater,
            "LessEqual" => BinaryKind::LessEq,
            "GreaterEqual" => BinaryKind::GreaterEq,
            "And" => BinaryKind::And,
            "Or" => BinaryKind::Or,
            other => bail!("binary op {other}"),
        };
        let ys = self.out_shape(node, 0)?;
        let dt = self.out_dtype(node)?;
        // max(x, c) and min(x, c) with a scalar constant are clips (relu for c = 0).
        if matches!(kind, BinaryKind::Max | BinaryKind::Min)
            && self.g.tensors[a].dtype == DType::F32
            && self.shape(a) == ys
        {
            if let Some(c) = self.scalar_f32(b) {
                let act = match kind {
                    BinaryKind::Max if c == 0.0 => Activation::plain(ActKind::Relu),
                    BinaryKind::Max => Activation {
                        kind: ActKind::Clip,
                        a: c,
                        b: f32::INFINITY,
                    },
                    _ => Activation {
                        kind: ActKind::Clip,
                        a: f32::NEG_INFINITY,
                        b: c,
                    },
                };
                let y = self
                    .g
                    .push(&node.name, Op::Unary(act), vec![a], DType::F32, ys);
                self.set(node, y);
                return Ok(());
            }
        }
        let y = self
            .g
            .push(&node.name, Op::Binary(kind), vec![a, b], dt, ys);
        self.set(node, y);
        Ok(())
    }

    fn element_wise(
        &mut self,
        node: &TypedNode,
        e: &tops::element_wise::ElementWiseOp,
        x: TensorId,
    ) -> Result<()> {
        let name = e.0.name();
        let ys = self.out_shape(node, 0)?;
        if name == "IsNan" {
            let y = self.g.push(&node.name, Op::IsNan, vec![x], DType::Bool, ys);
            self.set(node, y);
            return Ok(());
        }
        if self.g.tensors[x].dtype != DType::F32 {
            bail!("element-wise {name} on {:?}", self.g.tensors[x].dtype);
        }
        let plain = |k| Ok::<_, anyhow::Error>(Activation::plain(k));
        let act = match name.as_str() {
            "Sigmoid" => plain(ActKind::Sigmoid)?,
            "Tanh" => plain(ActKind::Tanh)?,
            "Erf" => plain(ActKind::Erf)?,
            "GeluExact" => plain(ActKind::Gelu)?,
            "Sqrt" => plain(ActKind::Sqrt)?,
            "Rsqrt" => plain(ActKind::Rsqrt)?,
            "Exp" => plain(ActKind::Exp)?,
            "Ln" => plain(ActKind::Log)?,
            "Neg" => plain(ActKind::Neg)?,
            "Abs" => plain(ActKind::Abs)?,
            "Recip" => plain(ActKind::Recip)?,
            "Square" => plain(ActKind::Square)?,
            "Floor" => plain(ActKind::Floor)?,
            "Ceil" => plain(ActKind::Ceil)?,
            "RoundHalfToEven" => plain(ActKind::Round)?,
            "Sin" => plain(ActKind::Sin)?,
            "Cos" => plain(ActKind::Cos)?,
            "HardSwish" => Activation {
                kind: ActKind::HardSwish,
                a: 1.0 / 6.0,
                b: 0.5,
            },
            "LeakyRelu" => {
                let l =
                    e.0.downcast_ref::<tops::nn::LeakyRelu>()
                        .ok_or_else(|| anyhow!("leaky relu"))?;
                Activation {
                    kind: ActKind::LeakyRelu,
                    a: l.alpha,
                    b: 0.0,
                }
            }
            "PowConst" => {
                let p =
                    e.0.downcast_ref::<tops::math::PowConst>()
                        .ok_or_else(|| anyhow!("pow"))?;
                if p.exponent == 2.0 {
                    plain(ActKind::Square)?
                } else if p.exponent == 0.5 {
                    plain(ActKind::Sqrt)?
                } else {
                    let c = self.g.constant(
                        format!("{}.exponent", node.name),
                        DType::F32,
                        vec![],
                        ConstData::F32(vec![p.exponent]),
                    );
                    let y = self.g.push(
                        &node.name,
                        Op::Binary(BinaryKind::Pow),
                        vec![x, c],
                        DType::F32,
                        ys,
                    );
                    self.set(node, y);
                    return Ok(());
                }
            }
            "Silu" => {
                let s = self.g.push(
                    format!("{}.sigmoid", node.name),
                    Op::Unary(plain(ActKind::Sigmoid)?),
                    vec![x],
                    DType::F32,
                    ys.clone(),
                );
                let y = self.g.push(
                    &node.name,
                    Op::Binary(BinaryKind::Mul),
                    vec![x, s],
                    DType::F32,
                    ys,
                );
                self.set(node, y);
                return Ok(());
            }
            other => bail!("element-wise {other}"),
        };
        let y = self
            .g
            .push(&node.name, Op::Unary(act), vec![x], DType::F32, ys);
        self.set(node, y);
        Ok(())
    }

    fn reduce(&mut self, node: &TypedNode, r: &tops::nn::Reduce, x: TensorId) -> Result<()> {
        use tops::nn::Reducer;
        let kind = match r.reducer {
            Reducer::Sum => ReduceKind::Sum,
            Reducer::Max => ReduceKind::Max,
            Reducer::Min => ReduceKind::Min,
            Reducer::Prod => ReduceKind::Prod,
            Reducer::MeanOfSquares => ReduceKind::SumSquare,
            ref other => bail!("reduction {other:?}"),
        };
        let axes = r.axes.iter().fold(0u32, |m, &a| m | (1 << a));
        let ys = self.out_shape(node, 0)?;
        let dt = self.out_dtype(node)?;
        let mut y = self.g.push(
            &node.name,
            Op::Reduce {
                kind,
                axes,
                keep_dims: true,
            },
            vec![x],
            dt,
            ys.clone(),
        );
        if matches!(r.reducer, Reducer::MeanOfSquares) {
            let xs = self.shape(x);
            let count: usize = r.axes.iter().map(|&a| xs[a]).product();
            let c = self.g.constant(
                format!("{}.count", node.name),
                DType::F32,
                vec![],
                ConstData::F32(vec![1.0 / count as f32]),
            );
            y = self.g.push(
                format!("{}.mean", node.name),
                Op::Binary(BinaryKind::Mul),
                vec![y, c],
                DType::F32,
                ys,
            );
        }
        self.set(node, y);
        Ok(())
    }

    fn pad(&mut self, node: &TypedNode, p: &tops::array::Pad, x: TensorId) -> Result<()> {
        let tops::array::PadMode::Constant(v) = &p.mode else {
            bail!("non-constant padding mode")
        };
        let dt = self.g.tensors[x].dtype;
        let value = v.cast_to_scalar::<f32>()?;
        // Pad = concat of constant blocks along each padded axis.
        let mut cur = x;
        for (axis, &(lo, hi)) in p.pads.iter().enumerate() {
            if lo == 0 && hi == 0 {
                continue;
            }
            let s = self.shape(cur);
            let mut parts = Vec::new();
            for (n, tag) in [(lo, "lo"), (hi, "hi")] {
                if n == 0 {
                    parts.push(None);
                    continue;
                }
                let mut bs = s.clone();
                bs[axis] = n;
                let count: usize = bs.iter().product();
                let data = match dt {
                    DType::F32 => ConstData::F32(vec![value; count]),
                    DType::I64 => ConstData::I64(vec![value as i64; count]),
                    DType::I32 => ConstData::I32(vec![value as i32; count]),
                    _ => ConstData::Bytes(vec![value as u8; count]),
                };
                parts.push(Some(self.g.constant(
                    format!("{}.pad{axis}{tag}", node.name),
                    dt,
                    bs,
                    data,
                )));
            }
            let mut list = Vec::new();
            if let Some(a) = parts[0] {
                list.push(a);
            }
            list.push(cur);
            if let Some(b) = parts[1] {
                list.push(b);
            }
            let mut ys = s.clone();
            ys[axis] += lo + hi;
            cur = self.g.push(
                format!("{}.axis{axis}", node.name),
                Op::Concat { axis: axis as u32 },
                list,
                dt,
                ys,
            );
        }
        self.finish(node, cur)
    }

    /// Lowers a two-operand einsum: a dense layer or pointwise convolution when one operand is
    /// constant, a strided batched product otherwise.
    fn einsum(
        &mut self,
        node: &TypedNode,
        e: &tops::einsum::EinSum,
        a: TensorId,
        b: TensorId,
    ) -> Result<()> {
        if e.operating_dt != DatumType::F32 {
            bail!("einsum in {:?}", e.operating_dt);
        }
        let (as_, bs) = (self.shape(a), self.shape(b));
        let ys = self.out_shape(node, 0)?;
        // Axis labels with their position in a, b, y and extent.
        struct Ax {
            pa: Option<usize>,
            pb: Option<usize>,
            py: Option<usize>,
            size: usize,
        }
        let mut axes = Vec::new();
        for ax in e.axes.iter_all_axes() {
            let one = |v: &TVec<usize>| -> Result<Option<usize>> {
                match v.len() {
                    0 => Ok(None),
                    1 => Ok(Some(v[0])),
                    _ => bail!("repeated einsum axis (diagonal)"),
                }
            };
            let (pa, pb, py) = (
                one(&ax.inputs[0])?,
                one(&ax.inputs[1])?,
                one(&ax.outputs[0])?,
            );
            let size = [pa.map(|p| as_[p]), pb.map(|p| bs[p]), py.map(|p| ys[p])]
                .into_iter()
                .flatten()
                .max()
                .unwrap_or(1);
            axes.push(Ax { pa, pb, py, size });
        }
        // Roles of the axes that matter (size > 1).
        let mut roles: Vec<(usize, Role)> = Vec::new();
        for (i, ax) in axes.iter().enumerate() {
            if ax.size == 1 {
                continue;
            }
            let role = match (ax.pa.is_some(), ax.pb.is_some(), ax.py.is_some()) {
                (true, true, true) => Role::Batch,
                (true, false, true) => Role::M,
                (false, true, true) => Role::N,
                (true, true, false) => Role::K,
                _ => bail!("einsum axis summed or broadcast outside the product"),
            };
            roles.push((i, role));
        }
        let role_of = |i: usize| roles.iter().find(|r| r.0 == i).map(|r| r.1);
        let seq = |pos: &dyn Fn(&Ax) -> Option<usize>, rank: usize| -> Vec<usize> {
            let mut s: Vec<(usize, usize)> = axes
                .iter()
                .enumerate()
                .filter(|(i, _)| role_of(*i).is_some())
                .filter_map(|(i, ax)| pos(ax).map(|p| (p, i)))
                .collect();
            s.sort();
            debug_assert!(s.len() <= rank);
            s.into_iter().map(|(_, i)| i).collect()
        };
        let a_seq = seq(&|ax| ax.pa, as_.len());
        let b_seq = seq(&|ax| ax.pb, bs.len());
        let y_seq = seq(&|ax| ax.py, ys.len());
        let of = |s: &[usize], r: Role| -> Vec<usize> {
            s.iter()
                .copied()
                .filter(|&i| role_of(i) == Some(r))
                .collect()
        };
        let size = |ids: &[usize]| -> usize { ids.iter().map(|&i| axes[i].size).product() };
        let a_const = self.konst(a).is_some();
        let b_const = self.konst(b).is_some();
        let has_batch = roles.iter().any(|r| r.1 == Role::Batch);
        if (a_const ^ b_const) && !has_batch {
            // Dense: x is the activation; its "M" axes are those not in the weight.
            let (x, w, x_seq, w_seq, m_role, n_role) = if b_const {
                (a, b, a_seq.clone(), b_seq.clone(), Role::M, Role::N)
            } else {
                (b, a, b_seq.clone(), a_seq.clone(), Role::N, Role::M)
            };
            let m_x = of(&x_seq, m_role);
            let k_x = of(&x_seq, Role::K);
            let m_y = of(&y_seq, m_role);
            let n_y = of(&y_seq, n_role);
            let (mt, kt, nt) = (size(&m_x), size(&k_x), size(&n_y));
            // Weight rearranged to [N (y order), K (x order)].
            let w_shape = self.shape(w);
            let w_pos = |i: usize| if b_const { axes[i].pb } else { axes[i].pa };
            let mut perm: Vec<usize> = n_y
                .iter()
                .chain(&k_x)
                .map(|&i| w_pos(i).expect("role axis in weight"))
                .collect();
            // Size-1 axes of the weight go first (they carry no data).
            let rest: Vec<usize> = (0..w_shape.len()).filter(|p| !perm.contains(p)).collect();
            let mut full = rest.clone();
            full.append(&mut perm);
            let wdata = self.konst(w).cloned().unwrap();
            let ConstData::F32(_) = wdata else {
                bail!("weights are not f32")
            };
            let wp = wdata.permuted(&w_shape, &full);
            debug_assert_eq!(w_seq.len(), n_y.len() + k_x.len());
            let wt = self.g.constant(
                format!("{}.weight", node.name),
                DType::F32,
                vec![nt, kt],
                wp,
            );
            self.g.tensors[wt].encoding = Encoding::PanelF32;
            let ys_full = ys.clone();
            // Pattern 1: x = [M.., K..], y = [M.., N..] -> dense on [Mt, Kt].
            let x_is_mk = x_seq == [m_x.clone(), k_x.clone()].concat();
            let y_is_mn = y_seq == [m_y.clone(), n_y.clone()].concat() && m_y == m_x;
            if x_is_mk && y_is_mn {
                let xv = self.g.reshaped(x, vec![mt, kt]);
                let y = self.g.push(
                    &node.name,
                    Op::Dense(Dense {
                        act: Activation::NONE,
                    }),
                    vec![xv, wt],
                    DType::F32,
                    vec![mt, nt],
                );
                return self.finish(node, y);
            }
            // Pattern 2: x = [B?, K.., S..], y = [B?, N.., S..] -> pointwise convolution.
            for lead in 0..=1usize.min(m_x.len()) {
                let (bx, sx) = m_x.split_at(lead);
                let x_ok = x_seq == [bx.to_vec(), k_x.clone(), sx.to_vec()].concat();
                let y_ok = y_seq == [bx.to_vec(), n_y.clone(), sx.to_vec()].concat();
                if x_ok && y_ok && !sx.is_empty() {
                    let (bt, st) = (size(bx), size(sx));
                    let xv = self.g.reshaped(x, vec![bt, kt, st, 1]);
                    let op = Op::Conv(Conv {
                        kernel: [1, 1],
                        stride: [1, 1],
                        pads: [0; 4],
                        dilation: [1, 1],
                        groups: 1,
                        act: Activation::NONE,
                        col_tile: 0,
                    });
                    let y = self.g.push(
                        &node.name,
                        op,
                        vec![xv, wt],
                        DType::F32,
                        vec![bt, nt, st, 1],
                    );
                    return self.finish(node, y);
                }
            }
            // Otherwise: transpose x to [M (y order), K], dense, transpose the result to y's order.
            let x_shape = self.shape(x);
            let x_pos = |i: usize| if b_const { axes[i].pa } else { axes[i].pb };
            let mut xperm: Vec<usize> =
                m_y.iter().chain(&k_x).map(|&i| x_pos(i).unwrap()).collect();
            let xrest: Vec<usize> = (0..x_shape.len()).filter(|p| !xperm.contains(p)).collect();
            let mut xfull = xrest;
            xfull.append(&mut xperm);
            let xt = self.transpose(&node.name, x, &xfull);
            let xv = self.g.reshaped(xt, vec![mt, kt]);
            let y = self.g.push(
                &node.name,
                Op::Dense(Dense {
                    act: Activation::NONE,
                }),
                vec![xv, wt],
                DType::F32,
                vec![mt, nt],
            );
            // y is [M.., N..] in y's M order and N order; move to y's axis order.
            let mn: Vec<usize> = m_y.iter().chain(&n_y).copied().collect();
            let mn_shape: Vec<usize> = mn.iter().map(|&i| axes[i].size).collect();
            let yv = self.g.reshaped(y, mn_shape);
            let perm: Vec<usize> = y_seq
                .iter()
                .map(|i| mn.iter().position(|j| j == i).unwrap())
                .collect();
            let yt = self.transpose(&node.name, yv, &perm);
            let yt = self.g.reshaped(yt, ys_full);
            self.set(node, yt);
            return Ok(());
        }
        // Batched product of activations (constants are read in place too).
        let m_a = of(&a_seq, Role::M);
        let n_b = of(&b_seq, Role::N);
        let k_a = of(&a_seq, Role::K);
        if m_a.len() > 1 || n_b.len() > 1 || k_a.len() > 1 {
            bail!("einsum with several row, column or inner axes between activations");
        }
        let batch_y = of(&y_seq, Role::Batch);
        // Each operand's view: its own axes in memory order, missing batch axes as size 1,
        // missing role axes as size-1 axes at the end.
        let mut view = |t: TensorId,
                        tseq: &[usize],
                        roles_t: [Option<usize>; 2]|
         -> Result<(TensorId, [u8; 2])> {
            let tb = of(tseq, Role::Batch);
            let in_order = batch_y
                .iter()
                .filter(|i| tb.contains(i))
                .copied()
                .collect::<Vec<_>>()
                == tb;
            if !in_order {
                bail!("einsum operand's batch axes are in another order than the output's");
            }
            let (src, src_seq) = (t, tseq.to_vec());
            let mut dims: Vec<usize> = Vec::new();
            let mut labels: Vec<Option<usize>> = Vec::new();
            let mut next_batch = 0;
            for &i in &src_seq {
                if role_of(i) == Some(Role::Batch) {
                    while batch_y[next_batch] != i {
                        dims.push(1);
                        labels.push(Some(batch_y[next_batch]));
                        next_batch += 1;
                    }
                    next_batch += 1;
                }
                dims.push(axes[i].size);
                labels.push(Some(i));
            }
            while next_batch < batch_y.len() {
                dims.push(1);
                labels.push(Some(batch_y[next_batch]));
                next_batch += 1;
            }
            let mut pos = [0u8; 2];
            for (slot, r) in roles_t.iter().enumerate() {
                match r.and_then(|i| labels.iter().position(|&l| l == Some(i))) {
                    Some(p) => pos[slot] = p as u8,
                    None => {
                        dims.push(1);
                        labels.push(None);
                        pos[slot] = (dims.len() - 1) as u8;
                    }
                }
            }
            let v = self.g.reshaped(src, dims);
            Ok((v, pos))
        };
        let (av, [a_m, a_k]) = view(a, &a_seq, [m_a.first().copied(), k_a.first().copied()])?;
        let (bv, [b_k, b_n]) = view(b, &b_seq, [k_a.first().copied(), n_b.first().copied()])?;
        let y_rank = self.shape(av).len();
        if self.shape(bv).len() != y_rank {
            bail!("einsum operands of different view ranks");
        }
        // Output view in y's memory order.
        let (yv_dims, y_m, y_n) = {
            let mut dims = Vec::new();
            let mut labels = Vec::new();
            for &i in &y_seq {
                dims.push(axes[i].size);
                labels.push(Some(i));
            }
            let mut find = |i: Option<usize>| -> u8 {
                match i.and_then(|i| labels.iter().position(|&l| l == Some(i))) {
                    Some(p) => p as u8,
                    None => {
                        dims.push(1);
                        labels.push(None);
                        (dims.len() - 1) as u8
                    }
                }
            };
            let y_m = find(m_a.first().copied());
            let y_n = find(n_b.first().copied());
            (dims, y_m, y_n)
        };
        if yv_dims.len() != y_rank {
            bail!("einsum output view rank mismatch");
        }
        let mm = MatMul {
            a_m,
            a_k,
            b_k,
            b_n,
            y_m,
            y_n,
        };
        let y = self.g.push(
            &node.name,
            Op::MatMul(mm),
            vec![av, bv],
            DType::F32,
            yv_dims,
        );
        self.finish(node, y)
    }
}

/// Explicit (before, after) padding per spatial axis.
fn padding(
    spec: &tops::cnn::PaddingSpec,
    input: &[usize],
    kernel: &[usize],
    strides: &[usize],
    dilations: &[usize],
) -> Result<(Vec<usize>, Vec<usize>)> {
    use tops::cnn::PaddingSpec::*;
    Ok(match spec {
        Explicit(b, a) => (b.to_vec(), a.to_vec()),
        // Ceil mode needs no extra padding: the output shape already holds the last window.
        ExplicitOnnxPool(b, a, _) => (b.to_vec(), a.to_vec()),
        Valid => (vec![0; input.len()], vec![0; input.len()]),
        SameUpper | SameLower => {
            let mut before = vec![0; input.len()];
            let mut after = vec![0; input.len()];
            for i in 0..input.len() {
                let out = input[i].div_ceil(strides[i]);
                let span = (kernel[i] - 1) * dilations[i] + 1;
                let total = ((out - 1) * strides[i] + span).saturating_sub(input[i]);
                let (lo, hi) = (total / 2, total - total / 2);
                if matches!(spec, SameUpper) {
                    before[i] = lo;
                    after[i] = hi;
                } else {
                    before[i] = hi;
                    after[i] = lo;
                }
            }
            (before, after)
        }
    })
}
