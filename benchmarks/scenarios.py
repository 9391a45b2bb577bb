"""The benchmark's scenarios: which tensors are saved, how they are produced,
and what the file must then hold. One record per scenario, in SCENARIOS.

This module knows nothing of the methods that save the tensors, of timing or
of reports. It imports torch only inside the functions that make tensors, so
that the driver (which reads the specs to describe and calibrate scenarios)
stays small: see measure.py for why that matters.

A spec is a list of (name, shape), every tensor bf16, in yield order.
Generators never keep a tensor in a local across a yield, so that a
streaming saver really holds one tensor at a time.

To add a scenario, write its spec function (and a producer if none of the
ones below fits) and append a Scenario record to SCENARIOS; its targets go
to targets.py. A scenario whose output is not one safetensors file (shards
and their index) gives its own verify; its methods write anywhere in the
run's directory (methods.py), and one that starts ranks of its own reports
their time and memory from save().
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

MIB = 1 << 20
Spec = list  # [(name, shape)]


# --------------------------------------------------------------------------
# Shapes.
# --------------------------------------------------------------------------


def model_spec(size_mib: int, tensor_mib: int) -> Spec:
    """Layer-like bf16 matrices of tensor_mib each adding up to about
    size_mib, then a 8 KiB norm vector per matrix."""
    cols = 4096
    rows = tensor_mib * MIB // (2 * cols)
    count = max(1, size_mib // tensor_mib)
    spec = [(f"model.layers.{i}.mlp.weight", (rows, cols)) for i in range(count)]
    spec += [(f"model.layers.{i}.norm.weight", (cols,)) for i in range(count)]
    return spec


def matrix_spec(size_mib: int, tensor_mib: int) -> Spec:
    """bf16 matrices of tensor_mib each (4096 columns), size_mib in all."""
    cols = 4096
    rows = tensor_mib * MIB // (2 * cols)
    count = max(1, size_mib // tensor_mib)
    return [(f"model.layers.{i}.mlp.weight", (rows, cols)) for i in range(count)]


def small_spec(count: int, min_kib: int, max_kib: int) -> Spec:
    """count bf16 vectors whose sizes spread evenly over [min_kib, max_kib]."""
    low, high = min_kib * 512, max_kib * 512  # bf16 elements
    return [
        (f"model.layers.{i // 100}.experts.{i % 100}.bias", (low + (i * 7919) % (high - low + 1),))
        for i in range(count)
    ]


def _attention(prefix: str, hidden: int, kv: int) -> Spec:
    return [
        (f"{prefix}.self_attn.q_proj.weight", (hidden, hidden)),
        (f"{prefix}.self_attn.k_proj.weight", (kv, hidden)),
        (f"{prefix}.self_attn.v_proj.weight", (kv, hidden)),
        (f"{prefix}.self_attn.o_proj.weight", (hidden, hidden)),
    ]


def _norms(prefix: str, hidden: int) -> Spec:
    return [
        (f"{prefix}.input_layernorm.weight", (hidden,)),
        (f"{prefix}.post_attention_layernorm.weight", (hidden,)),
    ]


def llama_spec(layers: int, hidden: int = 2048, kv: int = 512, intermediate: int = 5504,
               vocab: int = 8192) -> Spec:
    """A Llama-shaped state dict in the order transformers yields it:
    embeddings, then per layer q, k, v, o (grouped-query: k and v are
    narrower), gate, up, down and two norm weights (4 KiB at hidden 2048),
    then the final norm and the output embedding. 16 layers: 147 tensors,
    1.38 GiB, the largest tensor (an embedding) 2.3% of the total, as in a
    real 7B model."""
    spec = [("model.embed_tokens.weight", (vocab, hidden))]
    for layer in range(layers):
        prefix = f"model.layers.{layer}"
        spec += _attention(prefix, hidden, kv)
        spec += [
            (f"{prefix}.mlp.gate_proj.weight", (intermediate, hidden)),
            (f"{prefix}.mlp.up_proj.weight", (intermediate, hidden)),
            (f"{prefix}.mlp.down_proj.weight", (hidden, intermediate)),
        ]
        spec += _norms(prefix, hidden)
    spec += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return spec


def moe_spec(layers: int, experts: int = 16, hidden: int = 2048, kv: int = 512,
             expert_intermediate: int = 768, vocab: int = 8192) -> Spec:
    """A mixture-of-experts state dict (Mixtral / Qwen-MoE naming): per
    layer the attention matrices, a router (experts x hidden, 64 KiB), every
    expert's gate, up and down matrices (3 MiB each) and two 4 KiB norms;
    embeddings at both ends. 8 layers of 16 experts: 443 tensors, 1.34 GiB,
    mostly small matrices, with the router and norms below 1 MiB between
    them."""
    spec = [("model.embed_tokens.weight", (vocab, hidden))]
    for layer in range(layers):
        prefix = f"model.layers.{layer}"
        spec += _attention(prefix, hidden, kv)
        spec.append((f"{prefix}.mlp.gate.weight", (experts, hidden)))
        for expert in range(experts):
            mlp = f"{prefix}.mlp.experts.{expert}"
            spec += [
                (f"{mlp}.gate_proj.weight", (expert_intermediate, hidden)),
                (f"{mlp}.up_proj.weight", (expert_intermediate, hidden)),
                (f"{mlp}.down_proj.weight", (hidden, expert_intermediate)),
            ]
        spec += _norms(prefix, hidden)
    spec += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return spec


def nbytes(shape) -> int:
    return 2 * math.prod(shape)  # bf16


def total_bytes(spec: Spec) -> int:
    return sum(nbytes(shape) for _, shape in spec)


def largest_bytes(spec: Spec) -> int:
    return max(nbytes(shape) for _, shape in spec)


# --------------------------------------------------------------------------
# Producers: each a function of (cfg, spec, prepared) yielding (name, tensor).
# --------------------------------------------------------------------------


def fresh_tensors(cfg: dict, spec: Spec, prepared=None) -> Iterator:
    """Each tensor freshly made, as a training framework would hand it over."""
    import torch

    for index, (name, shape) in enumerate(spec):
        yield name, torch.full(shape, float(index % 7), dtype=torch.bfloat16)


def expect_fresh(cfg: dict, index: int, shape):
    import torch

    return torch.full(shape, float(index % 7), dtype=torch.bfloat16)


def _pattern(index: int, cols: int):
    import torch

    # Integers below 256 are exact in bf16; a value per column makes a
    # transposition error visible, which a constant fill would hide.
    return ((torch.arange(cols) + index) % 251).to(torch.bfloat16)


def transposed_tensors(cfg: dict, spec: Spec, prepared=None) -> Iterator:
    """Each tensor the transpose of a freshly made matrix: not contiguous."""
    import torch

    for index, (name, (rows, cols)) in enumerate(spec):
        storage = torch.empty((cols, rows), dtype=torch.bfloat16)
        storage.copy_(_pattern(index, cols).unsqueeze(1).expand(cols, rows))
        yield name, storage.t()


def expect_transposed(cfg: dict, index: int, shape):
    rows, cols = shape
    return _pattern(index, cols).expand(rows, cols)


def staging_buffers(cfg: dict, spec: Spec) -> dict:
    """Two staging buffers per shape, made before the save starts (as
    frameworks allocate pinned buffers once): the staged producer's memory,
    which is then not counted as any method's."""
    import torch

    buffers = {}
    for index, (_, shape) in enumerate(spec):
        key = (tuple(shape), index % 2)
        if key not in buffers:
            buffers[key] = torch.full(shape, float(index % 2), dtype=torch.bfloat16)
    return buffers


def _paced(cfg: dict, spec: Spec) -> Iterator:
    """(index, name, shape) of each tensor of the spec, each after a wait in
    proportion to its size (cfg's sleep_s_per_byte). The wait costs no CPU
    and releases the GIL, as DMA into pinned memory does, so on any machine
    the best a saver can do is max(produce, write); a producer that filled
    fresh tensors on the CPU would compete with the writer for this
    machine's cores.

    A sleep overshoots (by a millisecond on a busy machine), which over
    hundreds of small tensors would make the producer far slower than
    calibrated; what it overshoots is taken off the next waits."""
    per_byte = cfg.get("sleep_s_per_byte", 0.0)
    owed = 0.0
    for index, (name, shape) in enumerate(spec):
        owed += nbytes(shape) * per_byte
        if owed > 0:
            start = time.perf_counter()
            time.sleep(owed)
            owed -= time.perf_counter() - start
        yield index, name, shape


def staged_copies(cfg: dict, spec: Spec, buffers: dict) -> Iterator:
    """The slow producer: each tensor arrives after a wait in proportion to
    its size (a device-to-host copy, a gather; see _paced), in one of two
    reused staging buffers per shape. The buffers' contents never change,
    so a saver that still holds one when it comes round again writes the
    same bytes: the contract for reused buffers is the tests' business, not
    the benchmark's."""
    for index, name, shape in _paced(cfg, spec):
        yield name, buffers[(tuple(shape), index % 2)]


def model_weights(cfg: dict, spec: Spec) -> list:
    """A CPU model's own tensors: one distinct tensor per entry of the spec,
    each filled with expect_fresh's value, made before the save as a
    trainer's model is."""
    import torch

    return [torch.full(shape, float(index % 7), dtype=torch.bfloat16)
            for index, (_, shape) in enumerate(spec)]


def own_weights(cfg: dict, spec: Spec, weights: list) -> Iterator:
    """The model's own tensors, each yielded as it is (after a wait in
    proportion to its size when the scenario's producer is paced: a
    gather, a copy)."""
    for index, name, _ in _paced(cfg, spec):
        yield name, weights[index]


def expect_staged(cfg: dict, index: int, shape):
    import torch

    return torch.full(shape, float(index % 2), dtype=torch.bfloat16)


def gpu_sources(cfg: dict, spec: Spec) -> list:
    """The GPU producer's tensors, on the GPU before the save starts (made
    before the baseline memory is read, as a trained model is there already)."""
    import torch

    return [torch.full(shape, float(index % 7), dtype=torch.bfloat16, device="cuda")
            for index, (_, shape) in enumerate(spec)]


def copies_to_cpu(cfg: dict, spec: Spec, sources: list) -> Iterator:
    """Each GPU tensor copied to the CPU when it is requested, as checkpoint
    code does with .cpu() (or .full_tensor().cpu()): a device-to-host copy
    into fresh pageable memory, synchronous, with the GIL released."""
    for (name, _), source in zip(spec, sources):
        yield name, source.cpu()


def pinned_copies(cfg: dict, spec: Spec, sources: list) -> Iterator:
    """Each GPU tensor copied, when it is requested, into fresh pinned memory
    with a non-blocking copy, then waited for (the wait releases the GIL):
    the device-to-host copy of a checkpoint that uses pinned staging. The
    pinned memory comes from torch's caching host allocator, which hands a
    block out again only after the saver has dropped the tensor, so the
    saver's contract for reused buffers plays no part here."""
    import torch

    stream = torch.cuda.current_stream()
    for (name, shape), source in zip(spec, sources):
        host = torch.empty(shape, dtype=torch.bfloat16, pin_memory=True)
        host.copy_(source, non_blocking=True)
        stream.synchronize()
        yield name, host
        del host


class ModelItems:
    """A module's tensors in state_dict order, and the module itself for
    methods that save a module rather than a stream (save_pretrained)."""

    def __init__(self, model):
        self.model = model

    def __iter__(self) -> Iterator:
        return iter(self.model.state_dict().items())


def hf_llama(cfg: dict, spec: Spec):
    """A transformers LlamaForCausalLM whose state dict is exactly
    llama_spec(layers) (untied embeddings), in bf16, each tensor filled
    with expect_fresh's value: built on the meta device first, so that
    nothing is initialised twice."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=2048, intermediate_size=5504,
                         num_hidden_layers=cfg["layers"], num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=8192, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model = model.to_empty(device="cpu")
    state = model.state_dict()
    got = [(name, tuple(t.shape)) for name, t in state.items()]
    assert got == [(name, tuple(shape)) for name, shape in spec], "model and spec differ"
    with torch.no_grad():
        for index, (name, shape) in enumerate(spec):
            state[name].fill_(float(index % 7))
    return model


def model_tensors(cfg: dict, spec: Spec, model) -> ModelItems:
    return ModelItems(model)


def verify_checkpoint_folder(path: str, scenario, cfg: dict, spec: Spec) -> None:
    """The single file at path, or else the sharded checkpoint (or single
    model.safetensors) in path's folder: every tensor of the spec in the
    file its index names, with its shape and values."""
    import json
    import os

    import torch
    from safetensors import safe_open

    folder = os.path.dirname(path)
    index_path = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(path):
        folder, file = os.path.split(path)
        weight_map = {name: file for name, _ in spec}
    elif os.path.exists(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    else:
        weight_map = {name: "model.safetensors" for name, _ in spec}
    assert sorted(weight_map) == sorted(name for name, _ in spec), "index and spec differ"
    for index, (name, shape) in enumerate(spec):
        with safe_open(os.path.join(folder, weight_map[name]), framework="pt") as f:
            tensor = f.get_tensor(name)
        assert tuple(tensor.shape) == tuple(shape), name
        assert torch.equal(tensor, scenario.expected(cfg, index, shape)), f"{name}: wrong values"


# --------------------------------------------------------------------------
# The registry.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Size:
    """A command-line option that sizes a scenario: --{scenario}-{flag}
    (or the flag given, for the options older scripts pass)."""

    key: str  # the scenario config's key
    default: Any
    help: str
    flag: str  # without the leading dashes
    scaled: bool = True  # multiplied by --scale when not given explicitly


@dataclass(frozen=True)
class Scenario:
    """Everything that makes one scenario: its tensors, how they are
    produced, what the ratios are measured against, which methods run."""

    name: str
    summary: str  # one line, for --help
    sizes: tuple  # of Size
    spec: Callable[[dict], Spec]  # config -> [(name, shape)]
    describe: Callable[[dict, Spec], str]  # what is saved, for the reports
    produce: Callable[[dict, Spec, Any], Iterator]  # (config, spec, prepared) -> items
    expected: Callable[[dict, int, tuple], Any]  # the tensor the file must hold at an index
    # Made in the measuring process before its baseline memory is read
    # (buffers, a model on the GPU); passed to produce.
    prepare: Optional[Callable[[dict, Spec], Any]] = None
    # The method whose runs give the reference time, and which of their
    # figures the ratios divide by: "time" (its median time), "max(P, W)"
    # or "W", where P is the time spent producing the tensors and W the
    # rest (writing), both medians of the baseline's runs.
    baseline: str = "raw_os_write"
    reference: str = "time"
    # For a producer that waits in proportion to each tensor's size: its
    # speed relative to the writer (1.0: as fast, 2.0: twice as fast). The
    # driver calibrates the wait from raw writing's speed in the same run.
    producer_speed: Optional[float] = None
    methods: tuple = ()  # run by default, besides the baseline
    excluded: tuple = ()  # never run here (asked for or not)
    default: bool = True  # among the scenarios run when none are named
    needs_cuda: bool = False
    # (path, scenario, config, spec) -> None, raising if this project's
    # output is wrong; None: measure.verify_file, for one safetensors file.
    verify: Optional[Callable] = None

    @property
    def times_producer(self) -> bool:
        return self.reference != "time"

    @property
    def reference_label(self) -> str:
        if self.reference == "time":
            return {"raw_os_write": "raw", "raw_contiguous": "raw of .contiguous()"}.get(
                self.baseline, self.baseline)
        return self.reference


# Methods by role (names from methods.py).
IN_TURN = ("trinity_stream_saver", "trinity_overlap", "pure_python_saver")
WHOLE_DICT = ("safetensors_save_file", "torch_save")
# Whole-dict savers produce everything before writing anything, so a slow
# producer measures nothing of them (and they would see its reused staging
# buffers as shared tensors).
PRODUCER_EXCLUDED = WHOLE_DICT + ("raw_contiguous",)


def _describe_matrices(what: str) -> Callable[[dict, Spec], str]:
    return lambda cfg, spec: (f"{len(spec)} {what} of {cfg['tensor_mib']} MiB, "
                              f"{total_bytes(spec) / MIB:,.0f} MiB in all")


def _describe_model(kind: str) -> Callable[[dict, Spec], str]:
    def describe(cfg: dict, spec: Spec) -> str:
        share = largest_bytes(spec) / total_bytes(spec)
        return (f"{kind}, {len(spec)} bf16 tensors, {total_bytes(spec) / MIB:,.0f} MiB; "
                f"largest {largest_bytes(spec) / MIB:.0f} MiB ({share:.1%})")

    return describe


def _describe_large(cfg: dict, spec: Spec) -> str:
    big = sum(1 for _, s in spec if len(s) == 2)
    return (f"{big} bf16 matrices of {cfg['tensor_mib']} MiB + {len(spec) - big} norm vectors, "
            f"{total_bytes(spec) / MIB:,.0f} MiB in all")


def _describe_small(cfg: dict, spec: Spec) -> str:
    return (f"{len(spec):,} bf16 tensors of {cfg['min_kib']}-{cfg['max_kib']} KiB, "
            f"{total_bytes(spec) / MIB:,.1f} MiB in all")


def _llama(cfg: dict) -> Spec:
    return llama_spec(cfg["layers"])


def _moe(cfg: dict) -> Spec:
    return moe_spec(cfg["layers"], cfg["experts"])


_LLAMA_SIZES = (Size("layers", 16, "Llama-shaped: layers (16: 1.38 GiB)", "llama-layers"),)
_MOE_SIZES = (
    Size("layers", 8, "MoE-shaped: layers (8 of 16 experts: 1.34 GiB)", "moe-layers"),
    Size("experts", 16, "MoE-shaped: experts per layer", "moe-experts", scaled=False),
)
_PRODUCER_METHODS = IN_TURN + ("raw_queue_thread",)
# Saves made one after another in the measuring process, as a trainer saves
# its model again and again (cfg["saves"]; measure.py times all but the
# first, which pays for the process's first touch of memory).
_REPEATED_SIZES = _LLAMA_SIZES + (
    Size("saves", 4, "model_repeated*: saves per process (the first is not timed)",
         "repeated-saves", scaled=False),)


def _model_scenario(name: str, kind: str, sizes: tuple, spec, speed: float) -> Scenario:
    """A model-shaped stream from a producer that waits for each tensor, at
    the writer's speed or twice it."""
    twice = speed == 2.0
    return Scenario(
        name=name,
        summary=(f"{kind} stream, the producer {'twice as fast as' if twice else 'as fast as'} "
                 f"the writer (waits in proportion to each tensor's size)"),
        sizes=sizes, spec=spec, describe=_describe_model(kind),
        produce=staged_copies, expected=expect_staged, prepare=staging_buffers,
        # Twice as fast: the writer is the bottleneck, so the ideal is W.
        reference="W" if twice else "max(P, W)", producer_speed=speed,
        methods=_PRODUCER_METHODS, excluded=PRODUCER_EXCLUDED,
    )


SCENARIOS = {s.name: s for s in (
    Scenario(
        name="large",
        summary="1 GiB of 64 MiB bf16 matrices (plus small norm vectors)",
        sizes=(Size("size_mib", 1024, "large: MiB in all", "large-mib"),
               Size("tensor_mib", 64, "large: MiB per matrix", "large-tensor-mib", scaled=False)),
        spec=lambda cfg: model_spec(cfg["size_mib"], cfg["tensor_mib"]),
        describe=_describe_large, produce=fresh_tensors, expected=expect_fresh,
        methods=IN_TURN + WHOLE_DICT + ("produce_only",),
        excluded=("raw_contiguous",),
    ),
    Scenario(
        name="many_small",
        summary="50,000 bf16 tensors of 1-4 KiB",
        sizes=(Size("count", 50_000, "many_small: tensors", "small-count"),
               Size("min_kib", 1, "many_small: smallest tensor", "small-min-kib", scaled=False),
               Size("max_kib", 4, "many_small: largest tensor", "small-max-kib", scaled=False)),
        spec=lambda cfg: small_spec(cfg["count"], cfg["min_kib"], cfg["max_kib"]),
        describe=_describe_small, produce=fresh_tensors, expected=expect_fresh,
        methods=IN_TURN + WHOLE_DICT + ("produce_only",),
        excluded=("raw_contiguous",),
    ),
    Scenario(
        name="noncontig",
        summary="1 GiB of transposed (non-contiguous) 64 MiB bf16 matrices",
        sizes=(Size("size_mib", 1024, "noncontig: MiB in all", "noncontig-mib"),
               Size("tensor_mib", 64, "noncontig: MiB per matrix", "noncontig-tensor-mib",
                    scaled=False)),
        spec=lambda cfg: matrix_spec(cfg["size_mib"], cfg["tensor_mib"]),
        describe=_describe_matrices("transposed bf16 matrices"),
        produce=transposed_tensors, expected=expect_transposed,
        # A transposed tensor's own memory is not the file's bytes, so raw
        # writing here means .contiguous() first.
        baseline="raw_contiguous",
        methods=IN_TURN + WHOLE_DICT + ("produce_only",),
        excluded=("raw_os_write",),
    ),
    Scenario(
        name="slow_producer",
        summary=("2 GiB of 64 MiB bf16 matrices, each taking as long to produce as to write "
                 "(a calibrated wait, then one of two reused staging buffers)"),
        # 32 tensors: a pipeline of two stages cannot hide the first
        # tensor's production nor the last one's write, so with 16 tensors
        # 1/16 of the time would be lost whatever the saver.
        sizes=(Size("size_mib", 2048, "slow_producer: MiB in all", "slow-mib"),
               Size("tensor_mib", 64, "slow_producer: MiB per matrix", "slow-tensor-mib",
                    scaled=False),
               Size("sleep_ms", None, "slow_producer: wait per largest tensor, instead of "
                    "calibrating it", "slow-sleep-ms", scaled=False)),
        spec=lambda cfg: matrix_spec(cfg["size_mib"], cfg["tensor_mib"]),
        describe=_describe_matrices("bf16 matrices from a slow producer"),
        produce=staged_copies, expected=expect_staged, prepare=staging_buffers,
        reference="max(P, W)", producer_speed=1.0,
        methods=IN_TURN + ("produce_only",), excluded=PRODUCER_EXCLUDED,
    ),
    Scenario(
        name="gpu_producer",
        summary="(needs CUDA) bf16 matrices on the GPU, each copied with .cpu() when requested",
        sizes=(Size("size_mib", 4096, "gpu_producer: MiB in all", "gpu-mib"),
               Size("tensor_mib", 128, "gpu_producer: MiB per matrix", "gpu-tensor-mib",
                    scaled=False)),
        spec=lambda cfg: matrix_spec(cfg["size_mib"], cfg["tensor_mib"]),
        describe=_describe_matrices("bf16 matrices copied from the GPU"),
        produce=copies_to_cpu, expected=expect_fresh, prepare=gpu_sources,
        reference="max(P, W)",
        methods=IN_TURN + ("produce_only",), excluded=PRODUCER_EXCLUDED,
        default=False, needs_cuda=True,
    ),
    Scenario(
        name="gpu_llama",
        summary=("(needs CUDA) the Llama-shaped model on the GPU, each tensor copied to pinned "
                 "memory with a non-blocking copy when requested"),
        sizes=(Size("layers", 16, "gpu_llama: layers (16: 1.38 GiB)", "gpu-llama-layers"),),
        spec=_llama, describe=_describe_model("Llama-shaped, on the GPU"),
        produce=pinned_copies, expected=expect_fresh, prepare=gpu_sources,
        reference="max(P, W)",
        methods=_PRODUCER_METHODS + ("produce_only",), excluded=PRODUCER_EXCLUDED,
        default=False, needs_cuda=True,
    ),
    Scenario(
        name="sharded",
        summary=("a transformers Llama model (1 GiB, bf16) saved as a sharded Hugging Face "
                 "checkpoint, against the single-file save and save_pretrained"),
        sizes=(Size("layers", 12, "sharded: Llama layers (12: 1.04 GiB)", "sharded-layers"),
               Size("shard_mb", 200, "sharded: max_shard_size in MB (10^6 bytes)",
                    "sharded-shard-mb", scaled=False)),
        spec=_llama, describe=_describe_model("a transformers Llama model"),
        produce=model_tensors, expected=expect_fresh, prepare=hf_llama,
        verify=verify_checkpoint_folder,
        # What sharding costs over one file, written by the same saver.
        baseline="trinity_stream_saver",
        methods=("trinity_sharded", "hub_save_torch_state_dict", "transformers_save_pretrained",
                 "pure_python_saver", "raw_os_write"),
        excluded=PRODUCER_EXCLUDED,
    ),
    Scenario(
        name="model_repeated",
        summary=("a CPU model's own Llama-shaped tensors (distinct, made before the save), "
                 "saved again and again in one process, the producer instant"),
        sizes=_REPEATED_SIZES,
        spec=_llama, describe=_describe_model("Llama-shaped, a CPU model's own tensors"),
        produce=own_weights, expected=expect_fresh, prepare=model_weights,
        # Overlap against the in-turn mode, on the same tensors.
        baseline="trinity_stream_saver",
        methods=("trinity_overlap", "raw_os_write"), excluded=PRODUCER_EXCLUDED,
    ),
    Scenario(
        name="model_repeated_paced",
        summary=("the same, the producer as fast as the writer (waits in proportion to each "
                 "tensor's size)"),
        sizes=_REPEATED_SIZES,
        spec=_llama, describe=_describe_model("Llama-shaped, a CPU model's own tensors"),
        produce=own_weights, expected=expect_fresh, prepare=model_weights,
        reference="max(P, W)", producer_speed=1.0,
        methods=("trinity_stream_saver", "trinity_overlap"), excluded=PRODUCER_EXCLUDED,
    ),
    _model_scenario("llama", "Llama-shaped", _LLAMA_SIZES, _llama, 1.0),
    _model_scenario("llama_2x", "Llama-shaped", _LLAMA_SIZES, _llama, 2.0),
    _model_scenario("moe", "MoE-shaped", _MOE_SIZES, _moe, 1.0),
    _model_scenario("moe_2x", "MoE-shaped", _MOE_SIZES, _moe, 2.0),
)}
