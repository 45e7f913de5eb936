"""Per-rank memory profiler: exact tensor bytes by category, allocator, RSS and NVML, sampled at
named points of the step.

    prof = MemoryProfiler("zero2", engine, optimizer, device)      # or "zero3", "fsdp2", "single"
    with prof.track_activations() as acts:                         # optional: saved-for-backward bytes
        out = engine(input_ids=ids, labels=ids)
        acts.hold(out.logits)
    prof.sample("after_forward")
    engine.backward(out.loss); prof.sample("after_backward")
    engine.step();            prof.sample("after_step")
    ...
    prof.gather_and_write("runs/memory.json", "runs/memory.png")   # every rank calls it; rank 0 writes

`model` is the DeepSpeedEngine for zero1/2/3 (or any module for fsdp2/single); `optimizer` is the
client optimizer (MLorcAdamW, torch AdamW, ...; for DeepSpeed the engine's wrapper is accepted
too). The profiler hooks the client optimizer's step (`register_step_pre_hook`): at the first
step() call of a training step it measures everything, and over that step's calls (DeepSpeed
calls step() once per param group / sub-group) it adds up the gradients the optimizer is handed;
this becomes a sample named "step", recorded before the next named sample.
With mlorc_dist.step_in_backward there is no step() call: track_backward_grads(), called before
step_in_backward, adds post-accumulate-grad hooks that run before each in-backward step and
record the bytes of the gradients alive then (distinct storages of the held tensors' .grad: under
FSDP2 the unit's reduce-scatter output, which its sharded grads view); the largest goes into the
next sample as "grads_in_backward" (and into peaks).

Categories (bytes; each storage is counted once, in the first category that claims it):
    weights          parameter storage the rank keeps (ZeRO-1/2 flat bit16/fp32 buffers; ZeRO-3
                     partition buffer + persistent whole params; FSDP2 padded local shards), and
                     frozen parameters (requires_grad False: LoRA / SwitchLoRA base weights),
                     which no optimizer holds (ZeRO-1/2 and single: whole, in the module; ZeRO-3:
                     their own partitions, ds_tensor; FSDP2: their sharded DTensors)
    gathered_weights parameters gathered / unsharded right now (transient)
    master           fp32 master partition (DeepSpeed), when it is not the weights' own storage
    grads            gradients the optimizer holds (.grad of the tensors in its param groups; in
                     the "step" sample: numel x element size of those handed to each step() call)
    grad_staging     other gradient storage (module .grad, DeepSpeed averaged / partition grads)
    state_factors    optimizer state tensors named *_u, *_s, *_vh (MLorc factors)
    state_dense      other optimizer state tensors
    state_scalars    0-d optimizer state tensors (torch AdamW's step)
    engine_buffers   DeepSpeed reduce buckets, ZeRO-3 gradient partition buffer
    activations      from track_activations(): saved-for-backward storages + held outputs
Hardware, per sample: process RSS and its peak (VmHWM), and on CUDA the allocator's current/peak
allocated and reserved bytes and NVML used/total for the GPU of LOCAL_RANK. Without a GPU or NVML
the profiler says so once (a warning and a note in the report) and reports the rest.
"""
from __future__ import annotations

import os
import socket
import time
import warnings

import torch

__all__ = ["MemoryProfiler", "TENSOR_CATEGORIES", "rss_bytes", "nvml_memory", "node_rank"]

TENSOR_CATEGORIES = ("weights", "gathered_weights", "master", "grads", "grad_staging", "state_factors",
                     "state_dense", "state_scalars", "engine_buffers")
_FACTOR_SUFFIXES = ("_u", "_s", "_vh")
_ENGINE_ALIASES = {"plain": "single", "single": "single", "zero1": "zero1", "zero2": "zero2",
                   "zero3": "zero3", "fsdp2": "fsdp2", "deepspeed": "deepspeed", "zero": "deepspeed"}


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def rss_bytes() -> tuple[int | None, int | None]:
    """(current RSS, peak RSS) of this process, from /proc/self/status (psutil as a fallback)."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return (int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024)
    except (OSError, KeyError, ValueError):
        try:
            import psutil
            return psutil.Process().memory_info().rss, None
        except Exception:                              # noqa: BLE001
            return None, None


_NVML = {"state": None, "error": None}
_WARNED: set[str] = set()


def _nvml_handle(local_rank: int):
    """The NVML handle of the GPU that LOCAL_RANK uses (CUDA_VISIBLE_DEVICES remaps indices)."""
    import pynvml
    if _NVML["state"] is None:
        try:
            pynvml.nvmlInit()
            _NVML["state"] = True
        except Exception as exc:                       # noqa: BLE001  (NVMLError_LibraryNotFound, ...)
            _NVML["state"], _NVML["error"] = False, f"{type(exc).__name__}: {exc}"
    if not _NVML["state"]:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        entries = [e.strip() for e in visible.split(",") if e.strip()]
        entry = entries[local_rank] if local_rank < len(entries) else entries[-1]
        if entry.isdigit():
            return pynvml.nvmlDeviceGetHandleByIndex(int(entry))
        return pynvml.nvmlDeviceGetHandleByUUID(entry)
    return pynvml.nvmlDeviceGetHandleByIndex(local_rank)


def nvml_memory(local_rank: int) -> dict | None:
    """{"used", "total"} bytes of the GPU of `local_rank`, or None (no NVML, no GPU)."""
    try:
        handle = _nvml_handle(local_rank)
        if handle is None:
            return None
        import pynvml
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return {"used": int(info.used), "total": int(info.total)}
    except Exception as exc:                           # noqa: BLE001
        _NVML["state"], _NVML["error"] = False, f"{type(exc).__name__}: {exc}"
        return None


def node_rank(rank: int) -> int | None:
    """This process's node index from the launcher: torchrun's GROUP_RANK, DeepSpeed's
    CROSS_RANK, else rank // LOCAL_WORLD_SIZE (torchrun) or LOCAL_SIZE (DeepSpeed); None when
    the launcher says none of these."""
    for name in ("GROUP_RANK", "CROSS_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return rank // int(value)
    return None


def add_state_bytes(state, out: dict) -> None:
    """Add the bytes of every tensor in an optimizer state entry to out["state_factors"]
    (names ending in _u, _s, _vh), out["state_scalars"] (0-d) or out["state_dense"]. The
    planner counts its planned state with this same function."""
    def walk(value, key=""):
        if isinstance(value, torch.Tensor):
            local = _local(value)
            nbytes = local.numel() * local.element_size()
            if local.dim() == 0:
                out["state_scalars"] += nbytes
            elif key.endswith(_FACTOR_SUFFIXES):
                out["state_factors"] += nbytes
            else:
                out["state_dense"] += nbytes
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, str(k))
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v, key)
    walk(state)


class MemoryProfiler:
    """See the module docstring."""

    def __init__(self, engine_kind: str, model, optimizer=None, device=None, *, rank: int | None = None,
                 local_rank: int | None = None, hook_optimizer: bool = True):
        kind = _ENGINE_ALIASES.get(str(engine_kind).lower().replace("/", "").replace("-", ""))
        if kind is None:
            raise ValueError(f"engine_kind must be one of {sorted(set(_ENGINE_ALIASES))}, got {engine_kind!r}")
        self.zero = None
        self.module = model
        if hasattr(model, "module") and hasattr(model, "optimizer") and hasattr(model, "zero_optimization_stage"):
            self.module = model.module
            self.zero = model.optimizer                     # DeepSpeed's ZeRO wrapper
            stage = model.zero_optimization_stage()
            if kind == "deepspeed":
                kind = {1: "zero1", 2: "zero2", 3: "zero3"}.get(stage, "single")
        elif optimizer is not None and type(optimizer).__name__.startswith("DeepSpeedZeroOptimizer"):
            self.zero = optimizer
        if kind in ("zero1", "zero2", "zero3") and self.zero is None:
            raise ValueError(f"{kind}: pass the DeepSpeedEngine as `model` (or its ZeRO optimizer)")
        self.kind = kind
        client = optimizer
        if client is not None and client is self.zero:
            client = self.zero.optimizer
        if client is None and self.zero is not None:
            client = self.zero.optimizer
        self.optimizer = client
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        dist = torch.distributed
        initialised = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if initialised else 0)
        self.world_size = dist.get_world_size() if initialised else 1
        self.local_rank = local_rank if local_rank is not None else int(os.environ.get("LOCAL_RANK", 0))
        self.host = socket.gethostname()
        self.samples: list[dict] = []
        self.notes: list[str] = []
        self._pending_step: dict | None = None
        self._activations: int | None = None
        self._backward_grads: int | None = None
        self._grad_hooks: list = []
        self._t0 = time.time()
        self._hardware_notes()
        self._hook = None
        if hook_optimizer and client is not None and hasattr(client, "register_step_pre_hook"):
            self._hook = client.register_step_pre_hook(self._on_step)

    # ------------------------------------------------------------------ hardware
    def _hardware_notes(self) -> None:
        self.cuda = self.device.type == "cuda" and torch.cuda.is_available()
        if not self.cuda:
            self.notes.append("no CUDA device: allocator statistics and NVML are not reported; "
                              "process RSS and exact tensor bytes are")
        if self.cuda and nvml_memory(self.local_rank) is None:
            self.notes.append(f"NVML unavailable ({_NVML['error']}): GPU used/total not reported")
        elif not self.cuda:
            if nvml_memory(self.local_rank) is None and _NVML["error"]:
                self.notes.append(f"NVML unavailable ({_NVML['error']})")
        for note in self.notes:                    # said once per process, kept in every report
            if note not in _WARNED:
                _WARNED.add(note)
                warnings.warn(f"MemoryProfiler: {note}", stacklevel=3)

    def _hardware(self) -> dict:
        rss, rss_peak = rss_bytes()
        out = {"rss": rss, "rss_peak": rss_peak}
        if self.cuda:
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            out["cuda"] = {"allocated": torch.cuda.memory_allocated(index),
                           "max_allocated": torch.cuda.max_memory_allocated(index),
                           "reserved": torch.cuda.memory_reserved(index),
                           "max_reserved": torch.cuda.max_memory_reserved(index)}
            nv = nvml_memory(self.local_rank)
            if nv is not None:
                out["nvml"] = nv
        return out

    # ------------------------------------------------------------------ tensors
    def _param_tensors(self):
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                yield from group["params"]

    def measure(self) -> dict[str, int]:
        """Exact bytes by category, from the tensors themselves (each storage counted once)."""
        seen: set[int] = set()
        out = dict.fromkeys(TENSOR_CATEGORIES, 0)

        def add(category: str, tensor) -> None:
            if not isinstance(tensor, torch.Tensor):
                return
            local = _local(tensor)
            if local.device.type == "meta":
                return
            storage = local.untyped_storage()
            nbytes = storage.nbytes()
            if nbytes == 0 or storage.data_ptr() in seen:
                return
            seen.add(storage.data_ptr())
            out[category] += nbytes

        def add_all(category, tensors):
            if isinstance(tensors, dict):
                tensors = tensors.values()
            for t in tensors or ():
                if isinstance(t, (list, tuple)):
                    add_all(category, t)
                elif isinstance(t, dict):
                    add_all(category, t.values())
                else:
                    add(category, t)

        module_params = list(self.module.parameters()) if self.module is not None else []
        frozen = [p for p in module_params if not p.requires_grad]
        z = self.zero
        if self.kind in ("zero1", "zero2"):
            add_all("weights", z.bit16_groups_flat)
            add_all("weights", [p.data for p in frozen])     # not flattened: whole on every rank
            add_all("master", z.single_partition_of_fp32_groups)
            add_all("grads", [f.grad for f in z.single_partition_of_fp32_groups])
            add_all("grad_staging", [p.grad for p in module_params])
            add_all("grad_staging", [getattr(p, "grad_accum", None) for p in module_params])
            add_all("grad_staging", getattr(z, "averaged_gradients", {}))
            add("grad_staging", getattr(z, "grads_in_partition", None))
            add_all("engine_buffers", [b.buffer for b in getattr(z, "ipg_buckets", {}).values()])
        elif self.kind == "zero3":
            add("weights", getattr(z, "lp_param_buffer", None))
            add_all("weights", z.fp16_partitioned_groups_flat)
            add_all("weights", [p.data for p in module_params if getattr(p, "ds_persist", False)])
            add_all("weights", [getattr(p, "ds_tensor", None) for p in frozen])   # outside the flat buffers
            add_all("gathered_weights", [p.data for p in module_params])
            add_all("master", z.fp32_partitioned_groups_flat)
            add_all("grads", [f.grad for f in z.fp32_partitioned_groups_flat])
            add("engine_buffers", getattr(z, "grad_partitions_flat_buffer", None))
            add_all("engine_buffers", [b.buffer for b in getattr(z, "ipg_buckets", {}).values()])
            add_all("grad_staging", getattr(z, "averaged_gradients", {}))
            add_all("grad_staging", [p.grad for p in module_params])
        else:   # fsdp2, single: the optimizer holds the (sharded) parameters themselves
            held = list(self._param_tensors()) or module_params
            add_all("weights", held)
            # frozen params: FSDP2 keeps them sharded (DTensors) like the others; a plain tensor
            # there is unsharded right now
            add_all("weights", [p for p in frozen if self.kind == "single" or hasattr(p, "to_local")])
            add_all("gathered_weights", module_params)      # FSDP2: unsharded right now
            add_all("grads", [p.grad for p in held])
            add_all("grad_staging", [p.grad for p in module_params])
        if self.optimizer is not None:
            for entry in self.optimizer.state.values():
                add_state_bytes(entry, out)
        return out

    def _on_step(self, optimizer, args, kwargs) -> None:
        """Step pre-hook: the gradients handed to the optimizer in this call. "grads" of the step
        sample is their numel x element size summed over the step's calls (DeepSpeed may hand a
        view into its gradient staging buffer, whose storage is already in grad_staging); the
        distinct storage bytes of each call are kept too, in "step_call_grads"."""
        if self._pending_step is None:
            self._pending_step = self._record("step")
        seen, total, logical = set(), 0, 0
        for p in self._param_tensors():
            g = p.grad
            if g is None:
                continue
            local = _local(g)
            logical += local.numel() * local.element_size()
            storage = local.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        self._pending_step.setdefault("step_call_grads", []).append({"storage": total, "logical": logical})
        calls = self._pending_step["step_call_grads"]
        self._pending_step["tensors"]["grads"] = sum(c["logical"] for c in calls)
        self._pending_step["step_calls"] = len(self._pending_step["step_call_grads"])

    def track_backward_grads(self) -> None:
        """Record, at every post-accumulate-grad hook of the tensors the optimizer holds, the
        bytes of their gradients alive at that moment (each storage once). Call it before
        mlorc_dist.step_in_backward, so that these hooks run before its steps free each gradient."""
        params = list(self._param_tensors())

        def hook(_param) -> None:
            seen, total = set(), 0
            for p in params:
                g = p.grad
                if g is None:
                    continue
                storage = _local(g).untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
            self._backward_grads = max(self._backward_grads or 0, total)
        self._grad_hooks += [p.register_post_accumulate_grad_hook(hook) for p in params]

    # ------------------------------------------------------------------ samples
    def _record(self, name: str) -> dict:
        return {"name": name, "t": round(time.time() - self._t0, 4), "tensors": self.measure(),
                **self._hardware()}

    def sample(self, name: str) -> dict:
        """Measure now and keep it under `name` (after the "step" sample of any step() since)."""
        if self._pending_step is not None:
            self.samples.append(self._pending_step)
            self._pending_step = None
        record = self._record(name)
        if self._activations is not None:
            record["tensors"]["activations"] = self._activations
            self._activations = None
        if self._backward_grads is not None:
            record["grads_in_backward"] = self._backward_grads
            self._backward_grads = None
        self.samples.append(record)
        return record

    def track_activations(self):
        """A context manager measuring what autograd saves inside it (see ActivationTracker);
        the bytes go into the next sample as "activations"."""
        from .activations import ActivationTracker
        profiler = self
        params = list(self.module.parameters()) if self.module is not None else []

        class _Tracker(ActivationTracker):
            def __exit__(self, *exc):
                result = super().__exit__(*exc)
                profiler._activations = self.bytes
                return result
        return _Tracker(params)

    def peaks(self) -> dict:
        """Per category the largest value over all samples, and the hardware peaks."""
        peaks: dict = {}
        for s in self.samples:
            for k, v in s["tensors"].items():
                peaks[k] = max(peaks.get(k, 0), v)
            total = sum(v for k, v in s["tensors"].items() if k != "activations")
            peaks["tensor_total"] = max(peaks.get("tensor_total", 0), total)
            for key in ("rss", "rss_peak", "grads_in_backward"):
                if s.get(key) is not None:
                    peaks[key] = max(peaks.get(key, 0), s[key])
            for key, value in (s.get("cuda") or {}).items():
                peaks[f"cuda_{key}"] = max(peaks.get(f"cuda_{key}", 0), value)
            if s.get("nvml"):
                peaks["nvml_used"] = max(peaks.get("nvml_used", 0), s["nvml"]["used"])
                peaks["nvml_total"] = s["nvml"]["total"]
        return peaks

    def to_dict(self) -> dict:
        if self._pending_step is not None:
            self.samples.append(self._pending_step)
            self._pending_step = None
        return {"rank": self.rank, "local_rank": self.local_rank, "world_size": self.world_size,
                "host": self.host, "node_rank": node_rank(self.rank), "engine": self.kind, "device": str(self.device),
                "optimizer": type(self.optimizer).__name__ if self.optimizer is not None else None,
                "notes": list(self.notes), "samples": self.samples, "peaks": self.peaks()}

    def gather_and_write(self, path_json, path_png=None, plan: dict | None = None) -> dict | None:
        """Every rank's samples to rank 0 (all_gather_object when torch.distributed is
        initialised), which writes the JSON report, a table next to it (.txt) and the PNG.
        Collective: call it on every rank. Returns the report on rank 0, None elsewhere."""
        from .report import gather, write_report
        ranks = gather(self.to_dict())
        if self.rank != 0:
            return None
        return write_report(ranks, path_json, path_png, plan=plan)

    def close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for handle in self._grad_hooks:
            handle.remove()
        self._grad_hooks = []
