"""Activation memory of a Llama (HF `LlamaForCausalLM`, sdpa attention): an itemised estimate, and
a tracker that measures it.

What is estimated is what autograd keeps between forward and backward for ONE micro-batch of
b sequences of s tokens: every tensor saved for backward (deduplicated by storage, parameters
left out), plus the logits that the model output holds. It was derived op by op from
transformers 5.x `modeling_llama` and checked against `ActivationTracker` (saved-tensor hooks):
exact on CPU for fp32 and bf16, with and without activation checkpointing (tests/test_memory.py).

Per decoder layer and token, with p = bytes of the activation dtype, h = hidden size,
kv = num_key_value_heads * head_dim, a = attention heads, f = intermediate size:

    2 RMSNorms   2 x (4h + 4 + 2 p h)  input upcast to fp32 (saved by pow and mul; in fp32 runs
                                       it is the input itself), rsqrt (fp32), x * rsqrt cast to p
                                       (saved by `weight *`), the norm output (saved by the
                                       projections that read it)
    attention    p (2h + 2 kv) + 4a    rotated q and k, v, the sdpa output (which the transpose /
                                       contiguous / o_proj path reuses), the fp32 log-sum-exp of
                                       the flash kernel
    MLP          4 p f                 gate, silu(gate), up, silu(gate) * up

once per micro-batch: token ids (8 b s), rotary cos and sin (2 s d p, broadcast over the batch),
the final RMSNorm (4h + 4 + 2ph per token), the fp32 log-softmax of the loss (4 V per token),
the shifted labels (8 b s; 8 (s + 1) when b = 1, a view of the padded labels), the logits held
by the output (p V per token).

Adapters (`adapter=`, rank r, T adapted linears per layer: 7 for the q/k/v/o/gate/up/down
targets). Each adapted linear adds its r-wide A x (p r per token, saved by B); its input is
saved by A as the base linear would save it. SwitchLoRA changes nothing else (embeddings,
lm_head and norms stay trainable). LoRA freezes everything else, so autograd keeps less: no
token ids (the embedding needs no gradient), no `weight *` input in any RMSNorm (its weight is
frozen: 4h + 4 + p h a norm), nothing of the first layer's first RMSNorm but its output (its
input, the embedding output, needs no gradient: p h), and of the final RMSNorm only 4h + 4 (the
frozen lm_head does not keep its input), unless ZeRO-3's linear (`linear_saves_input`: DeepSpeed
replaces torch.nn.functional.linear by one that always saves its input) keeps it (+ p h). With
checkpointing, LoRA keeps no token ids, the inputs of layers 2..L only, and the same final norm.

Assumptions, said once: sdpa runs a flash-style kernel (the CPU kernel and the CUDA flash /
memory-efficient kernels save q, k, v, out and the log-sum-exp; the math fallback, used when an
explicit attention mask is passed, would add a b a s s probability tensor per layer); no dropout
(Llama has none); no padding mask. With activation checkpointing (HF
`gradient_checkpointing_enable`, one checkpoint per decoder layer) each layer keeps only its
input (p h per token) and the cos/sin, and backward recomputes one layer at a time, so the peak
adds one layer's full activations.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ActivationItem", "llama_activation_items", "activation_bytes", "ActivationTracker"]


@dataclass(frozen=True)
class ActivationItem:
    name: str
    bytes: int
    formula: str


def _dims(config):
    h = config.hidden_size
    a = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or a
    d = getattr(config, "head_dim", None) or h // a
    return h, a, kv_heads * d, a * d, d, config.intermediate_size, config.num_hidden_layers, config.vocab_size


def llama_activation_items(config, micro_batch: int, seq: int, dtype_bytes: int,
                           checkpointing: bool = False, *, adapter: str | None = None,
                           adapter_rank: int = 0, adapter_targets: int = 7,
                           linear_saves_input: bool = False) -> tuple[list[ActivationItem], int]:
    """(items saved at the end of forward, extra bytes at the backward peak) for one micro-batch.

    adapter: None, "lora" (only the adapters train) or "switchlora" (the adapted linears' W
    frozen), with rank `adapter_rank` on `adapter_targets` linears per layer; linear_saves_input:
    ZeRO-3's replacement of torch.nn.functional.linear (see the module docstring)."""
    if adapter not in (None, "lora", "switchlora"):
        raise ValueError(f"adapter must be None, 'lora' or 'switchlora', got {adapter!r}")
    h, a, kv, q_width, d, f, layers, vocab = _dims(config)
    p, t = dtype_bytes, micro_batch * seq
    lora = adapter == "lora"
    norm = 4 * h + 4 + 2 * p * h
    layer_norm = 4 * h + 4 + p * h if lora else norm
    adapters = adapter_targets * adapter_rank * p if adapter else 0
    per_layer = 2 * layer_norm + p * (2 * q_width + 2 * kv) + 4 * a + 4 * p * f + adapters
    norm_text = "4h + 4 + ph" if lora else "4h + 4 + 2ph"
    adapter_text = f" + {adapter_targets} r p" if adapter else ""
    items = [] if lora else [ActivationItem("token ids", 8 * t, "8 b s")]
    if checkpointing:
        kept = layers - 1 if lora else layers
        items.append(ActivationItem(f"layer inputs x {kept} (checkpointed)", kept * p * h * t,
                                    "(L - 1) p h b s (LoRA: the first is the frozen embedding's output)"
                                    if lora else "L p h b s"))
    else:
        items.append(ActivationItem("rotary cos, sin", 2 * seq * d * p, "2 s d p"))
        first = (4 * h + 4) * t if lora else 0        # LoRA: layer 1's first norm keeps its output only
        items.append(ActivationItem(f"decoder layers x {layers}", layers * per_layer * t - first,
                                    f"L b s [2({norm_text}) + p(2h + 2kv) + 4a + 4pf{adapter_text}]"
                                    + (" - b s (4h + 4)" if lora else "")))
    if lora:
        final = 4 * h + 4 + (p * h if linear_saves_input else 0)
        final_text = "b s (4h + 4" + (" + ph, kept by ZeRO-3's linear)" if linear_saves_input else ")")
    else:
        final, final_text = norm, "b s (4h + 4 + 2ph)"
    items += [
        ActivationItem("final RMSNorm", final * t, final_text),
        # labels: padded by one position and shifted; with b > 1 the shifted view is copied
        # (b s), with b = 1 it stays a view of the padded (s + 1) labels
        ActivationItem("loss: fp32 log-softmax + labels", 4 * vocab * t + 4
                       + 8 * (seq + 1 if micro_batch == 1 else t), "b s (4V + 8) + 4"),
        ActivationItem("logits held by the output", p * vocab * t, "p V b s"),
    ]
    # Backward peak on top of what forward saved: checkpointing recomputes one layer (its full
    # activations, with cos/sin); the loss backward materialises the fp32 logits gradient.
    extra = 4 * vocab * t
    if checkpointing:
        extra += per_layer * t + 2 * seq * d * p
    return items, extra


def activation_bytes(config, micro_batch: int, seq: int, dtype_bytes: int,
                     checkpointing: bool = False, **adapter) -> tuple[int, int]:
    """(bytes saved at the end of forward, estimated backward peak) for one micro-batch
    (`adapter` keywords: those of llama_activation_items)."""
    items, extra = llama_activation_items(config, micro_batch, seq, dtype_bytes, checkpointing, **adapter)
    saved = sum(i.bytes for i in items)
    return saved, saved + extra


class ActivationTracker:
    """Measures activation memory: bytes of every distinct storage that autograd saves for
    backward inside the `with` block (parameters excluded), plus tensors handed to `.hold()`
    (e.g. the logits the output keeps). Pack hooks return the tensor itself: nothing is copied
    and nothing is kept alive longer than autograd keeps it.

        with ActivationTracker(model.parameters()) as acts:
            out = model(input_ids=ids, labels=ids)
            acts.hold(out.logits)
        acts.bytes
    """

    def __init__(self, params=()):
        self._param_ptrs = set()
        for p in params:
            local = p.to_local() if hasattr(p, "to_local") else p
            if local.numel():
                self._param_ptrs.add(local.untyped_storage().data_ptr())
        self._storages: dict[int, int] = {}
        self._hooks = None

    def _pack(self, tensor):
        if isinstance(tensor, torch.nn.Parameter) or (tensor.is_leaf and tensor.requires_grad):
            return tensor
        if isinstance(tensor._base, torch.nn.Parameter):
            # a view of a parameter (mm saves W.t() of a frozen W); FSDP2's unsharded parameters
            # are not among those the tracker was given, and their storage is freed at reshard
            return tensor
        self._add(tensor)
        return tensor

    def _add(self, tensor) -> None:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        try:
            storage = local.untyped_storage()
        except (RuntimeError, NotImplementedError):   # tensor subclasses without storage
            return
        ptr = storage.data_ptr()
        if ptr in self._param_ptrs or ptr in self._storages:
            return
        self._storages[ptr] = storage.nbytes()

    def hold(self, *tensors) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._add(t)

    @property
    def bytes(self) -> int:
        return sum(self._storages.values())

    def __enter__(self):
        self._storages.clear()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        self._hooks = None
        return False
