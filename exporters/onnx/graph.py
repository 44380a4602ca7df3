"""Decoder graphs built op by op from a bundle, without tracing: export takes seconds, every family of the
architecture table is covered by the same code, and each op is one we chose.

Two variants share the builder:
- portable: standard ONNX ops only (opset 17, 20 or 23), Optimum's I/O contract (input_ids, attention_mask over
  past+current, position_ids, past_key_values.N.key/value in BNSH sized by KV heads -> logits, present.N.*).
  Grouped-query attention is computed without expanding KV heads (queries reshaped to [B, kv, group, T, hd]).
- ort: ONNX Runtime's fused contrib ops (GroupQueryAttention with rotary inside, SkipSimplifiedLayerNormalization,
  packed QKV and gate/up matmuls, QuickGelu) with the same I/O minus position_ids, as onnxruntime-genai expects.
- static (for MNN, opset 17, batch 1): the KV cache is a fixed-capacity buffer [1, kv, capacity, hd] in and out;
  new keys/values are scattered into the slots given by position_ids and queries see slots <= their position.
  Decode steps then keep every input shape, so an engine that plans per shape (MNN) plans once, not per token.
  The graph starts from inputs_embeds [1, S, hidden]: the runtime looks rows up in a 16-bit embedding file, as
  MNN's own LLM engine does (its converter would store a Gather table in fp32 and never quantize it). RoPE's
  cos/sin [1, S, hd] are inputs too, computed by the runtime in fp32: MNN's `--fp16` truncates every float constant
  to fp16, the inverse frequencies included, an error that grows with the position.

Weights are stored transposed for MatMul ([in, out]); a tied lm_head gets its own constant so quantizers reach it.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from toolkit.core import rope
from toolkit.core.arch import ArchConfig
from toolkit.core.bundle import ModelBundle

MASKED = -1e9  # additive bias of a masked key: finite, so a padding row (all keys masked) cannot turn into NaN
DIMS = ("batch_size", "sequence_length", "past_sequence_length", "total_sequence_length")


@dataclass
class Graph:
    opset: int
    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    _used: Counter = field(default_factory=Counter)
    _consts: dict = field(default_factory=dict)

    def _unique(self, name: str) -> str:
        self._used[name] += 1
        return name if self._used[name] == 1 else f"{name}_{self._used[name] - 1}"

    def op(self, op_type: str, inputs: list[str], name: str, outputs: int | list[str] = 1, domain: str = "",
           **attrs):
        """Add a node; returns its output name (or names when it has several)."""
        name = self._unique(name)
        outs = outputs if isinstance(outputs, list) else [f"{name}/out{i}" if i else f"{name}/out"
                                                           for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def weight(self, name: str, array: np.ndarray) -> str:
        # (np.ascontiguousarray would turn a 0-d scalar into shape [1])
        array = array if array.flags.c_contiguous else array.copy(order="C")
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def const(self, value, dtype=np.int64) -> str:
        """A small constant, shared by value."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._consts[key] = self.weight(f"const_{len(self._consts)}", array)
        return self._consts[key]

    # --- helpers whose form depends on the opset ---
    def reduce_mean_last(self, x: str, name: str) -> str:
        if self.opset >= 18:
            return self.op("ReduceMean", [x, self.const([-1])], name, keepdims=1)
        return self.op("ReduceMean", [x], name, axes=[-1], keepdims=1)

    def reduce_sum_last(self, x: str, name: str) -> str:  # ReduceSum took axes as an input already in opset 13
        return self.op("ReduceSum", [x, self.const([-1])], name, keepdims=1)


def _np(bundle: ModelBundle, name: str) -> np.ndarray:
    return bundle.load(name, torch.float32).numpy()


def _matmul_weight(g: Graph, bundle: ModelBundle, name: str) -> str:
    return g.weight(name, _np(bundle, name).T)


# why no graph here can hold dynamic NTK scaling (toolkit/core/rope.py refuses it with this)
DYNAMIC_REFUSAL = ("the graphs hold fixed RoPE frequencies (the portable graph's constant inverse frequencies, "
                   "GroupQueryAttention's cos/sin cache)")


def _rope_inv_freq(cfg: ArchConfig) -> np.ndarray:
    # from toolkit.core.rope, computed as toolkit.core.model.RotaryTable computes it (torch, fp32), so the angles agree bit
    # for bit
    return rope.fixed_frequencies(cfg, "ONNX export", DYNAMIC_REFUSAL)[0]


def _rope_attention_scaling(cfg: ArchConfig) -> float:
    """What cos and sin are multiplied by (yarn's attention factor; 1 otherwise)."""
    return rope.fixed_frequencies(cfg, "ONNX export", DYNAMIC_REFUSAL)[1]


class _Builder:
    def __init__(self, bundle: ModelBundle, opset: int, variant: str):
        self.bundle, self.cfg, self.variant = bundle, bundle.config, variant
        self.g = Graph(opset)
        self.eps = float(self.cfg.rms_norm_eps)

    # --- shared pieces ---
    def norm_weight(self, name: str, size: int) -> str:
        """The norm's weight, or ones where the family's norms are weightless (NanoChat): fused norm ops need one."""
        if name in self.bundle.tensors:
            return self.g.weight(name, _np(self.bundle, name))
        return self.g.const(np.ones(size, np.float32), np.float32)

    def rms(self, x: str, weight: str, name: str, size: int) -> str:
        g = self.g
        if g.opset >= 23:
            return g.op("RMSNormalization", [x, self.norm_weight(weight, size)], name, axis=-1, epsilon=self.eps,
                        stash_type=1)
        mean_sq = g.reduce_mean_last(g.op("Mul", [x, x], f"{name}/square"), f"{name}/mean")
        inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [mean_sq, g.const(self.eps, np.float32)], f"{name}/eps")],
                                       f"{name}/sqrt")], f"{name}/inv")
        scaled = g.op("Mul", [x, inv], f"{name}/scale")
        if weight not in self.bundle.tensors:  # weightless norm
            return scaled
        return g.op("Mul", [scaled, self.norm_weight(weight, size)], f"{name}/weight")

    def gptq_matmul(self, x: str, weights: list[str], name: str) -> str | None:
        """MatMulNBits straight from a GPTQ checkpoint's codes, scales and zero points (ort variant): the weights
        the checkpoint holds, not a re-quantization. accuracy_level 0 (fp32 compute), so the export verifies
        within 1e-4 against the dequantized weights; `quantize int4 --format onnx` switches it to 4. Several
        weights (packed q/k/v, gate/up) are stacked along N. None where the weights are not GPTQ."""
        q = self.bundle.provenance.get("quantization") or {}
        parts = [self.bundle.quantized_parts.get(w) for w in weights]
        gs = q.get("group_size", -1)
        if self.variant != "ort" or q.get("quant_method") != "gptq" or not all(parts) or gs < 16 or gs & (gs - 1):
            return None
        from toolkit.core import gptq_format

        unpacked = [gptq_format.unpack(load()) for load in parts]
        if not all(gptq_format.consecutive_groups(u[3], gs) for u in unpacked):
            return None  # act-order without static groups (AutoGPTQ's desc_act): MatMulNBits blocks are consecutive
        codes = torch.cat([u[0] for u in unpacked])  # [N, K]
        scales = torch.cat([u[1].T for u in unpacked])  # [N, blocks]
        zeros = torch.cat([u[2].T for u in unpacked])
        N, K = codes.shape
        blocks = K // gs
        c = codes.reshape(N, blocks, gs).to(torch.uint8).numpy()
        packed = c[..., 0::2] | (c[..., 1::2] << 4)  # element 2i in the low nibble, 2i + 1 in the high one
        g = self.g
        inputs = [x, g.weight(f"{name}.qweight", packed),
                  g.weight(f"{name}.scales", scales.float().numpy().reshape(-1))]
        if not bool((zeros == 8).all()):  # 8 is MatMulNBits' default zero point at 4 bits
            z = zeros.to(torch.uint8).numpy()
            if blocks % 2:
                z = np.concatenate([z, np.zeros((N, 1), np.uint8)], axis=1)
            inputs.append(g.weight(f"{name}.qzeros", (z[:, 0::2] | (z[:, 1::2] << 4)).reshape(-1)))
        return g.op("MatMulNBits", inputs, f"{name}/MatMulNBits", domain="com.microsoft", K=K, N=N, bits=4,
                    block_size=gs, accuracy_level=0)

    def linear(self, x: str, weight: str, name: str, bias: str | None = None) -> str:
        y = self.gptq_matmul(x, [weight], name) or self.g.op(
            "MatMul", [x, _matmul_weight(self.g, self.bundle, weight)], f"{name}/MatMul")
        if bias:
            y = self.g.op("Add", [y, self.g.weight(bias, _np(self.bundle, bias))], f"{name}/Add")
        return y

    def silu(self, x: str, name: str) -> str:
        if self.variant == "ort":
            return self.g.op("QuickGelu", [x], f"{name}/QuickGelu", domain="com.microsoft", alpha=1.0)
        return self.g.op("Mul", [x, self.g.op("Sigmoid", [x], f"{name}/Sigmoid")], f"{name}/Mul")

    def mlp(self, x: str, prefix: str, name: str) -> str:
        g = self.g
        if self.variant == "ort":  # one matmul for gate and up
            names = [f"{prefix}.gate_proj.weight", f"{prefix}.up_proj.weight"]
            both = self.gptq_matmul(x, names, f"{name}/gate_up_proj")
            if both is None:
                w = g.weight(f"{prefix}.gate_up_proj.weight", np.concatenate([_np(self.bundle, n) for n in names]).T)
                both = g.op("MatMul", [x, w], f"{name}/gate_up_proj/MatMul")
            sizes = [self.bundle.tensors[n].shape[0] for n in names]
            gate_out, up_out = g.op("Split", [both, g.const(sizes)], f"{name}/Split", outputs=2, axis=-1)
        else:
            gate_out = self.linear(x, f"{prefix}.gate_proj.weight", f"{name}/gate_proj")
            up_out = self.linear(x, f"{prefix}.up_proj.weight", f"{name}/up_proj")
        act = g.op("Mul", [self.silu(gate_out, f"{name}/act"), up_out], f"{name}/gate_mul")
        return self.linear(act, f"{prefix}.down_proj.weight", f"{name}/down_proj")

    def moe(self, x: str, prefix: str, name: str) -> str:
        """Dense form of the routed MoE: every expert runs on every token and is weighted by its routing weight,
        zero where not chosen; the sum equals the reference's gather/scatter form."""
        g, cfg = self.g, self.cfg
        probs = g.op("Softmax", [self.linear(x, f"{prefix}.gate.weight", f"{name}/gate")], f"{name}/Softmax", axis=-1)
        top, chosen = g.op("TopK", [probs, g.const([cfg.num_experts_per_tok])], f"{name}/TopK", outputs=2, axis=-1)
        if cfg.norm_topk_prob:
            top = g.op("Div", [top, g.reduce_sum_last(top, f"{name}/top_sum")], f"{name}/renorm")
        weights = g.op("ScatterElements", [g.op("Mul", [probs, g.const(0.0, np.float32)], f"{name}/zeros"), chosen,
                                           top], f"{name}/ScatterElements", axis=-1)
        total = None
        for e in range(cfg.num_experts):
            out = self.mlp(x, f"{prefix}.experts.{e}", f"{name}/experts.{e}")
            w = g.op("Slice", [weights, g.const([e]), g.const([e + 1]), g.const([-1])], f"{name}/experts.{e}/weight")
            out = g.op("Mul", [out, w], f"{name}/experts.{e}/weighted")
            total = out if total is None else g.op("Add", [total, out], f"{name}/experts.{e}/sum")
        if cfg.fam.shared_expert:
            shared = self.mlp(x, f"{prefix}.shared_expert", f"{name}/shared_expert")
            if cfg.fam.shared_expert_gated:
                gate = self.linear(x, f"{prefix}.shared_expert_gate.weight", f"{name}/shared_expert_gate")
                shared = g.op("Mul", [g.op("Sigmoid", [gate], f"{name}/shared_expert_gate/Sigmoid"), shared],
                              f"{name}/shared_expert/gated")
            total = g.op("Add", [total, shared], f"{name}/shared_expert/sum")
        return total

    def relu2_mlp(self, x: str, prefix: str, name: str) -> str:
        g = self.g
        h = g.op("Relu", [self.linear(x, f"{prefix}.fc1.weight", f"{name}/fc1")], f"{name}/Relu")
        return self.linear(g.op("Mul", [h, h], f"{name}/square"), f"{prefix}.fc2.weight", f"{name}/fc2")

    def ffn(self, x: str, layer: int) -> str:
        prefix, name = f"model.layers.{layer}.mlp", f"/model/layers.{layer}/mlp"
        if self.cfg.fam.moe:
            return self.moe(x, prefix, name)
        return self.relu2_mlp(x, prefix, name) if self.cfg.fam.mlp == "relu2" else self.mlp(x, prefix, name)

    def embed(self) -> str:
        g = self.g
        if self.variant == "static":
            h = "inputs_embeds"
            if self.cfg.fam.embed_norm:
                h = self.rms(h, "model.norm.weight", "/model/embed_norm", self.cfg.hidden_size)
            return h
        h = g.op("Gather", [g.weight("model.embed_tokens.weight", _np(self.bundle, "model.embed_tokens.weight")),
                            "input_ids"], "/model/embed_tokens/Gather", axis=0)
        if self.cfg.fam.embed_norm:
            h = self.rms(h, "model.norm.weight", "/model/embed_norm", self.cfg.hidden_size)
        return h

    def lm_head(self, x: str) -> str:
        bundle, g, cap = self.bundle, self.g, self.cfg.logit_softcap
        name = "model.embed_tokens.weight" if self.cfg.tie_word_embeddings else "lm_head.weight"
        # its own constant even when tied: the embedding Gather and the head MatMul are quantized differently
        w = g.weight("lm_head.weight", _np(bundle, name).T)
        if not cap:
            return g.op("MatMul", [x, w], "/lm_head/MatMul", outputs=["logits"])
        raw = g.op("MatMul", [x, w], "/lm_head/MatMul")
        capped = g.op("Tanh", [g.op("Div", [raw, g.const(cap, np.float32)], "/softcap/Div")], "/softcap/Tanh")
        return g.op("Mul", [capped, g.const(cap, np.float32)], "/softcap/Mul", outputs=["logits"])

    # --- portable attention ---
    def rotary(self) -> tuple[str, str]:
        """cos/sin [B, T, 1, hd] from position_ids, as the reference computes them."""
        g = self.g
        if self.variant == "static":  # given (signed) by the runtime
            return (g.op("Unsqueeze", ["rope_cos", g.const([2])], "/rotary/cos"),
                    g.op("Unsqueeze", ["rope_sin", g.const([2])], "/rotary/sin"))
        pos = g.op("Cast", ["position_ids"], "/rotary/Cast", to=TensorProto.FLOAT)
        freqs = g.op("Mul", [g.op("Unsqueeze", [pos, g.const([-1])], "/rotary/Unsqueeze"),
                             g.const(_rope_inv_freq(self.cfg), np.float32)], "/rotary/freqs")
        emb = g.op("Concat", [freqs, freqs], "/rotary/Concat", axis=-1)
        cos, sin = g.op("Cos", [emb], "/rotary/Cos"), g.op("Sin", [emb], "/rotary/Sin")
        scale = _rope_attention_scaling(self.cfg)
        if scale != 1.0:  # yarn: cos and sin scaled after they are computed, as the reference does
            cos = g.op("Mul", [cos, g.const(scale, np.float32)], "/rotary/cos_scaled")
            sin = g.op("Mul", [sin, g.const(scale, np.float32)], "/rotary/sin_scaled")
        if self.cfg.fam.rope_sign < 0:  # rotation by -theta
            sin = g.op("Neg", [sin], "/rotary/Neg")
        return (g.op("Unsqueeze", [cos, g.const([2])], "/rotary/cos"),
                g.op("Unsqueeze", [sin, g.const([2])], "/rotary/sin"))

    def apply_rotary(self, x: str, cos: str, sin: str, name: str) -> str:
        g, half = self.g, self.cfg.head_dim // 2
        x1, x2 = g.op("Split", [x, g.const([half, half])], f"{name}/Split", outputs=2, axis=-1)
        rotated = g.op("Concat", [g.op("Neg", [x2], f"{name}/Neg"), x1], f"{name}/Concat", axis=-1)
        return g.op("Add", [g.op("Mul", [x, cos], f"{name}/mul_cos"), g.op("Mul", [rotated, sin], f"{name}/mul_sin")],
                    f"{name}/Add")

    def attention_mask(self) -> str:
        """allowed[B, 1, 1, T, S]: causal over absolute key slots, padding keys excluded, each query sees itself
        (a padding query would otherwise see nothing; its output is never used)."""
        g = self.g
        total = g.op("Gather", [g.op("Shape", ["attention_mask"], "/mask/Shape"), g.const(1)], "/mask/total")
        seq = g.op("Gather", [g.op("Shape", ["input_ids"], "/mask/ShapeIds"), g.const(1)], "/mask/seq")
        past = g.op("Sub", [total, seq], "/mask/past")
        k_pos = g.op("Unsqueeze", [g.op("Range", [g.const(0), total, g.const(1)], "/mask/k_range"), g.const([0])],
                     "/mask/k_pos")
        q_pos = g.op("Unsqueeze", [g.op("Range", [past, total, g.const(1)], "/mask/q_range"), g.const([1])],
                     "/mask/q_pos")
        causal = g.op("LessOrEqual", [k_pos, q_pos], "/mask/causal")  # [T, S]
        itself = g.op("Equal", [k_pos, q_pos], "/mask/self")
        valid = g.op("Unsqueeze", [g.op("Cast", ["attention_mask"], "/mask/Cast", to=TensorProto.BOOL),
                                   g.const([1])], "/mask/valid")  # [B, 1, S]
        allowed = g.op("Or", [g.op("And", [causal, valid], "/mask/And"), itself], "/mask/Or")  # [B, T, S]
        return g.op("Unsqueeze", [allowed, g.const([1, 2])], "/mask/allowed")

    def portable_attention(self, x: str, layer: int, cos: str, sin: str, allowed: str, slots: str | None) -> str:
        g, cfg = self.g, self.cfg
        nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        prefix, name = f"model.layers.{layer}.self_attn", f"/model/layers.{layer}/attn"
        bias = cfg.fam.qkv_bias
        q = self.linear(x, f"{prefix}.q_proj.weight", f"{name}/q_proj", f"{prefix}.q_proj.bias" if bias else None)
        k = self.linear(x, f"{prefix}.k_proj.weight", f"{name}/k_proj", f"{prefix}.k_proj.bias" if bias else None)
        v = self.linear(x, f"{prefix}.v_proj.weight", f"{name}/v_proj", f"{prefix}.v_proj.bias" if bias else None)
        q = g.op("Reshape", [q, g.const([0, 0, nh, hd])], f"{name}/q_heads")
        k = g.op("Reshape", [k, g.const([0, 0, nkv, hd])], f"{name}/k_heads")
        v = g.op("Reshape", [v, g.const([0, 0, nkv, hd])], f"{name}/v_heads")
        if cfg.fam.qk_norm:
            q = self.rms(q, f"{prefix}.q_norm.weight", f"{name}/q_norm", hd)
            k = self.rms(k, f"{prefix}.k_norm.weight", f"{name}/k_norm", hd)
        q = self.apply_rotary(q, cos, sin, f"{name}/q_rotary")
        k = self.apply_rotary(k, cos, sin, f"{name}/k_rotary")
        k = g.op("Transpose", [k], f"{name}/k_bnsh", perm=[0, 2, 1, 3])
        v = g.op("Transpose", [v], f"{name}/v_bnsh", perm=[0, 2, 1, 3])
        if slots is None:  # growing cache: append
            present_k = g.op("Concat", [f"past_key_values.{layer}.key", k], f"{name}/present_key",
                             outputs=[f"present.{layer}.key"], axis=2)
            present_v = g.op("Concat", [f"past_key_values.{layer}.value", v], f"{name}/present_value",
                             outputs=[f"present.{layer}.value"], axis=2)
        else:  # fixed-capacity cache: write into the slots of these positions
            present_k = g.op("ScatterND", [f"past_key_values.{layer}.key", slots, k], f"{name}/present_key",
                             outputs=[f"present.{layer}.key"])
            present_v = g.op("ScatterND", [f"past_key_values.{layer}.value", slots, v], f"{name}/present_value",
                             outputs=[f"present.{layer}.value"])
        # queries grouped by the KV head they share: [B, kv, group, T, hd]; keys broadcast over the group
        q = g.op("Transpose", [g.op("Reshape", [q, g.const([0, 0, nkv, nh // nkv, hd])], f"{name}/q_groups")],
                 f"{name}/q_bgnth", perm=[0, 2, 3, 1, 4])
        k_t = g.op("Transpose", [g.op("Unsqueeze", [present_k, g.const([2])], f"{name}/k_unsqueeze")],
                   f"{name}/k_t", perm=[0, 1, 2, 4, 3])
        scores = g.op("Mul", [g.op("MatMul", [q, k_t], f"{name}/qk"), g.const(1.0 / np.sqrt(hd), np.float32)],
                      f"{name}/scale")
        scores = g.op("Where", [allowed, scores, g.const(-np.inf, np.float32)], f"{name}/masked")
        probs = g.op("Softmax", [scores], f"{name}/Softmax", axis=-1)
        out = g.op("MatMul", [probs, g.op("Unsqueeze", [present_v, g.const([2])], f"{name}/v_unsqueeze")],
                   f"{name}/pv")
        out = g.op("Reshape", [g.op("Transpose", [out], f"{name}/out_bthd", perm=[0, 3, 1, 2, 4]),
                               g.const([0, 0, nh * hd])], f"{name}/merge_heads")
        return self.linear(out, f"{prefix}.o_proj.weight", f"{name}/o_proj")

    def static_mask(self) -> str:
        """allowed[1, 1, 1, S, capacity]: slot j is visible to the query at position p iff j <= p (slots are written
        in position order, so later slots hold nothing yet or stale values)."""
        g = self.g
        capacity = g.op("Gather", [g.op("Shape", ["past_key_values.0.key"], "/mask/Shape"), g.const(2)],
                        "/mask/capacity")
        slots = g.op("Range", [g.const(0), capacity, g.const(1)], "/mask/slots")  # [C]
        q_pos = g.op("Unsqueeze", [g.op("Squeeze", ["position_ids", g.const([0])], "/mask/positions"),
                                   g.const([1])], "/mask/q_pos")  # [S, 1]
        return g.op("Unsqueeze", [g.op("LessOrEqual", [slots, q_pos], "/mask/causal"), g.const([0, 1, 2])],
                    "/mask/allowed")

    def scatter_slots(self) -> str:
        """ScatterND indices [1, kv, S, 3] = (0, head, position) for writing S new keys into the cache."""
        g, nkv = self.g, self.cfg.num_kv_heads
        pos = g.op("Unsqueeze", ["position_ids", g.const([1, 3])], "/cache/pos")  # [1, 1, S, 1]
        heads = g.const(np.arange(nkv).reshape(1, nkv, 1, 1))
        shape = g.op("Shape", [g.op("Add", [pos, heads], "/cache/broadcast")], "/cache/shape")  # [1, kv, S, 1]
        parts = [g.op("Expand", [g.const(np.zeros((1, 1, 1, 1), np.int64)), shape], "/cache/batch"),
                 g.op("Expand", [heads, shape], "/cache/heads"), g.op("Expand", [pos, shape], "/cache/slots")]
        return g.op("Concat", parts, "/cache/indices", axis=-1)

    def portable(self) -> None:
        g, cfg, H = self.g, self.cfg, self.cfg.hidden_size
        h = self.embed()
        cos, sin = self.rotary()
        static = self.variant == "static"
        allowed = self.static_mask() if static else self.attention_mask()
        slots = self.scatter_slots() if static else None
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}"
            normed = self.rms(h, f"{p}.input_layernorm.weight", f"/model/layers.{i}/input_norm", H)
            a = self.portable_attention(normed, i, cos, sin, allowed, slots)
            h = g.op("Add", [h, a], f"/model/layers.{i}/attn_residual")
            m = self.ffn(self.rms(h, f"{p}.post_attention_layernorm.weight", f"/model/layers.{i}/post_norm", H), i)
            h = g.op("Add", [h, m], f"/model/layers.{i}/mlp_residual")
        self.lm_head(self.rms(h, "model.norm.weight", "/model/norm", H))

    # --- ort variant ---
    def skip_norm(self, x: str, residual: str, weight: str, name: str) -> tuple[str, str]:
        """(norm(x + residual), x + residual) in one fused op."""
        normed, _, _, total = self.g.op("SkipSimplifiedLayerNormalization",
                                        [x, residual, self.norm_weight(weight, self.cfg.hidden_size)], name,
                                        outputs=[f"{name}/out", "", "", f"{name}/sum"], domain="com.microsoft",
                                        epsilon=self.eps)
        return normed, total

    def ort(self) -> None:
        g, cfg = self.g, self.cfg
        nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        total = g.op("Gather", [g.op("Shape", ["attention_mask"], "/mask/Shape"), g.const(1)], "/mask/total")
        total32 = g.op("Cast", [total], "/mask/total_int32", to=TensorProto.INT32)
        ids_shape = g.op("Shape", ["input_ids"], "/mask/ShapeIds")
        batch = g.op("Gather", [ids_shape, g.const([0])], "/mask/batch")
        seq = g.op("Gather", [ids_shape, g.const([1])], "/mask/seq")
        # every row keeps all slots (left padding included) so the cache layout is the same for the whole batch;
        # padding keys are removed by the additive bias. RoPE then runs on slot indices: a left-padded row is
        # shifted uniformly, and rotary attention scores depend only on relative positions.
        seqlens = g.op("Expand", [g.op("Sub", [total32, g.const(1, np.int32)], "/mask/seqlens_k_scalar"), batch],
                       "/mask/seqlens_k")
        valid = g.op("Cast", ["attention_mask"], "/mask/Cast", to=TensorProto.BOOL)
        bias = g.op("Where", [valid, g.const(0.0, np.float32), g.const(MASKED, np.float32)], "/mask/bias")
        bias = g.op("Unsqueeze", [bias, g.const([1, 2])], "/mask/bias_4d")  # [B, 1, 1, S]
        shape = g.op("Concat", [batch, g.const([1]), seq, g.op("Unsqueeze", [total, g.const([0])], "/mask/total_1d")],
                     "/mask/bias_shape", axis=0)
        bias = g.op("Expand", [bias, shape], "/mask/attention_bias")
        positions = np.arange(cfg.max_position_embeddings, dtype=np.float32)[:, None]
        angles = positions * _rope_inv_freq(cfg)[None, :]
        # yarn's attention factor scales both tables (GroupQueryAttention multiplies by them as they are); a negative
        # sin table makes it rotate by -theta (NanoChat)
        scale = np.float32(_rope_attention_scaling(cfg))
        cos_cache = g.weight("cos_cache", (np.cos(angles) * scale).astype(np.float32))
        sin_cache = g.weight("sin_cache", (cfg.fam.rope_sign * (np.sin(angles) * scale)).astype(np.float32))

        h = self.embed()
        x = g.op("SimplifiedLayerNormalization",
                 [h, self.norm_weight("model.layers.0.input_layernorm.weight", cfg.hidden_size)],
                 "/model/layers.0/input_norm", axis=-1, epsilon=self.eps, stash_type=1)
        for i in range(cfg.num_layers):
            p, name = f"model.layers.{i}", f"/model/layers.{i}"
            a = p + ".self_attn"
            names = [f"{a}.{t}_proj.weight" for t in "qkv"]
            qkv = self.gptq_matmul(x, names, f"{name}/attn/qkv_proj")
            if qkv is None:
                w = np.concatenate([_np(self.bundle, n) for n in names])
                qkv = g.op("MatMul", [x, g.weight(f"{a}.qkv_proj.weight", w.T)], f"{name}/attn/qkv_proj/MatMul")
            if cfg.fam.qkv_bias:
                b = np.concatenate([_np(self.bundle, f"{a}.{t}_proj.bias") for t in "qkv"])
                qkv = g.op("Add", [qkv, g.weight(f"{a}.qkv_proj.bias", b)], f"{name}/attn/qkv_proj/Add")
            if cfg.fam.qk_norm:  # CPU GQA does not take the norm weights: normalise q and k per head first
                q, k, v = g.op("Split", [qkv, g.const([nh * hd, nkv * hd, nkv * hd])], f"{name}/attn/Split",
                               outputs=3, axis=-1)
                normed = []
                for t, heads, src in (("q", nh, q), ("k", nkv, k)):
                    r = g.op("Reshape", [src, g.const([0, 0, heads, hd])], f"{name}/attn/{t}_heads")
                    r = g.op("SimplifiedLayerNormalization", [r, self.norm_weight(f"{a}.{t}_norm.weight", hd)],
                             f"{name}/attn/{t}_norm", axis=-1, epsilon=self.eps, stash_type=1)
                    normed.append(g.op("Reshape", [r, g.const([0, 0, heads * hd])], f"{name}/attn/{t}_flat"))
                qkv_inputs = [normed[0], normed[1], v]
            else:
                qkv_inputs = [qkv, "", ""]
            attn, _, _ = g.op("GroupQueryAttention",
                              [*qkv_inputs, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens,
                               total32, cos_cache, sin_cache, "", bias],
                              f"{name}/attn/GroupQueryAttention",
                              outputs=[f"{name}/attn/out", f"present.{i}.key", f"present.{i}.value"],
                              domain="com.microsoft", num_heads=nh, kv_num_heads=nkv, do_rotary=1,
                              rotary_interleaved=0, scale=float(1.0 / np.sqrt(hd)), local_window_size=-1)
            attn = self.linear(attn, f"{a}.o_proj.weight", f"{name}/attn/o_proj")
            x, h = self.skip_norm(attn, h, f"{p}.post_attention_layernorm.weight", f"{name}/post_norm")
            m = self.ffn(x, i)
            nxt = f"model.layers.{i + 1}.input_layernorm.weight" if i + 1 < cfg.num_layers else "model.norm.weight"
            norm_name = f"/model/layers.{i + 1}/input_norm" if i + 1 < cfg.num_layers else "/model/norm"
            x, h = self.skip_norm(m, h, nxt, norm_name)
        self.lm_head(x)

    def model(self) -> onnx.ModelProto:
        cfg = self.cfg
        if self.variant == "ort":
            self.ort()
        else:
            self.portable()
        batch, seq, past, total = DIMS
        if self.variant == "static":
            batch, past, total = 1, "capacity", "capacity"
        kv = [cfg.num_kv_heads, None, cfg.head_dim]
        if self.variant == "static":
            inputs = [helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, [1, seq, cfg.hidden_size]),
                      helper.make_tensor_value_info("rope_cos", TensorProto.FLOAT, [1, seq, cfg.head_dim]),
                      helper.make_tensor_value_info("rope_sin", TensorProto.FLOAT, [1, seq, cfg.head_dim])]
        else:
            inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [batch, seq]),
                      helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [batch, total])]
        if self.variant != "ort":
            inputs.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64, [batch, seq]))
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, seq, cfg.vocab_size])]
        for i in range(cfg.num_layers):
            for t in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{t}", TensorProto.FLOAT,
                                                            [batch, kv[0], past, kv[2]]))
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{t}", TensorProto.FLOAT,
                                                             [batch, kv[0], total, kv[2]]))
        graph = helper.make_graph(self.g.nodes, "decoder", inputs, outputs, self.g.initializers)
        opsets = [helper.make_opsetid("", self.g.opset)]
        if self.variant == "ort":
            opsets.append(helper.make_opsetid("com.microsoft", 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="edge-toolkit")
        # the lowest IR version that carries these opsets: runtimes older than the onnx package still load it
        model.ir_version = helper.find_min_ir_version_for(opsets, ignore_unknown=True)
        return model


def build(bundle: ModelBundle, opset: int = 20, variant: str = "portable") -> onnx.ModelProto:
    return _Builder(bundle, opset, variant).model()
