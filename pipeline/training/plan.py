"""The plan of a run: everything decided before DeepSpeed starts, decided once.

`build_plan(cfg, world_size)` reads the model's config.json and weight index, resolves the layer
groups, partitions the stages, derives the batch plan, merges the DeepSpeed JSON and opens the
data, checking each against the others. Every rank builds the same plan before any rank starts
DeepSpeed, so a mistake fails in seconds with one message naming the config line; after that,
nothing is re-derived: the engine, the loop and run.json all read the plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from data_prep.errors import UserError
from data_prep.files import check_writable
from data_prep.reader import MIX_BLOCK, Mixture, TokenWindows, open_mixture

from .. import hf
from ..config import RunConfig, data_sources, eval_sources, report_to, resolve_paths
from ..groups import FORMAT, FROZEN, RAW, LayerGroups
from ..names import EMBED_WEIGHT, HEAD_WEIGHT, NORM, layer_of, tied_embeddings, to_pipeline_name
from ..rundir import RunDir
from . import deepspeed_json

# Keys that may change between a run and its resumption without changing what it computes.
RESUMABLE = {
    "save_every",
    "keep_last",
    "log_every",
    "dist_timeout_s",
    "verify_data",
    "eval_every",
    "eval_batches",
    "eval_data",
    "report_to",
    "wandb_project",
}

# Relative cost of one layer per micro-batch, in units of one forward pass. A trained layer does
# forward + backward for activations + backward for weights (~3x). A frozen layer that gradients
# must still flow through (it sits above a trained layer) skips only the weight gradient (~2x).
# A frozen layer below every trained layer runs forward only (~1x).
COST_TRAINED, COST_BACKPROP, COST_FORWARD = 3.0, 2.0, 1.0


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    micro_batch: int
    dp_size: int
    grad_accum: int

    def describe(self) -> str:
        return (
            f"global batch {self.global_batch} = micro {self.micro_batch} x accumulation {self.grad_accum} "
            f"x data-parallel {self.dp_size}"
        )


@dataclass
class EvalSet:
    """One set validated during training: `batches` eval batches of the global batch size, always
    samples [0, batches * G) of `data` under the run's seed (distinct windows: no set repeats one)."""

    key: str  # metrics.jsonl key: val_loss or val_loss_NAME
    what: str  # for the layer map: manifest(s) and split
    data: object = field(repr=False)  # TokenWindows or Mixture
    batches: int
    note: str = ""  # set when fewer batches than eval_batches fit


@dataclass
class RunPlan:
    cfg: RunConfig
    model_dir: Path
    tokenizer_dir: Path
    hf_config: dict
    base_model: dict
    weights: dict[str, str]  # HF tensor name -> safetensors file of the base model
    shapes: dict[str, tuple]  # HF tensor name -> shape (tied: no lm_head)
    groups: LayerGroups
    world_size: int
    stages: list[int]  # [0, b1, ..., L]: stage s holds layers [stages[s], stages[s+1])
    batch: BatchPlan
    ds_config: dict  # what DeepSpeed receives
    ds_path: Path
    dtype: object  # torch dtype the stage's weights are held in
    data: Mixture = field(repr=False)
    evals: list[EvalSet] = field(default_factory=list)  # empty: no validation
    eval_note: str = ""  # why the run's own val split is not validated, if it is not
    chat_template: dict | None = None  # the template the chat data was rendered with (data_template)

    @property
    def num_stages(self) -> int:
        return len(self.stages) - 1

    @property
    def clips_globally(self) -> bool:
        """Without ZeRO on several stages the engine, not DeepSpeed, clips by the global norm."""
        return self.num_stages > 1 and self.ds_config.get("zero_optimization", {}).get("stage", 0) == 0

    def stage_of_layer(self, i: int) -> int:
        return next(s for s in range(self.num_stages) if self.stages[s] <= i < self.stages[s + 1])

    def layer_names(self, i: int) -> list[str]:
        """HF tensor names that pipeline layer i holds (embeddings on 0, norm and head on L-1)."""
        L = self.groups.num_layers
        names = [n for n in self.shapes if to_pipeline_name(n, L)[0] == i]
        if self.groups.tied and i == L - 1:
            names.append(HEAD_WEIGHT)  # the last layer's head reads the shared embedding matrix
        return names

    def numel(self, names) -> int:
        shapes = {**self.shapes, HEAD_WEIGHT: self.shapes.get(HEAD_WEIGHT, self.shapes[EMBED_WEIGHT])}
        n = 0
        for name in names:
            k = 1
            for d in shapes[name]:
                k *= d
            n += k
        return n

    def memory_per_stage(self) -> list[dict]:
        """Bytes one rank of each stage holds at its peak: weights, gradients and optimizer state
        (`stage_memory`), the activations of the micro-batches it has in flight
        (`stage_activations`) and backward's buffers (`accumulation_buffers`). make bench
        (bench/stage_memory.py) holds each rank's measured peak RSS to 1.1 x this."""
        zero = self.ds_config.get("zero_optimization", {}).get("stage", 0)
        g, L, P = self.groups, self.groups.num_layers, self.num_stages
        anchoring = self.cfg.groups.anchor_weight > 0 and self.cfg.groups.phase == "raw"
        out = []
        for s in range(P):
            layers = range(self.stages[s], self.stages[s + 1])
            names = [n for i in layers for n in self.layer_names(i)]
            if self.groups.tied and self.num_stages == 1:
                names = [n for n in names if n != HEAD_WEIGHT]  # one shared Parameter on one stage
            trained = [n for n in names if self.groups.trains(n)]
            # With anchoring, each raw layer also holds a frozen copy of its base weights.
            copies = [
                n
                for i in layers
                if anchoring and g.group_of_layer(i) == RAW
                for n in self.layer_names(i)
                if layer_of(n) == i
            ]
            m = stage_memory(
                self.numel(names) + self.numel(copies), self.numel(trained), self.dtype, zero, self.batch.dp_size
            )
            m["activations"] = stage_activations(
                self.hf_config,
                [(activation_kind(g, i), i == g.first_trained_layer) for i in layers],
                last=self.stages[s + 1] == L,
                tokens=self.batch.micro_batch * self.cfg.data.seq_len,
                positions=self.cfg.data.seq_len,
                in_flight=self.in_flight(s),
                dtype=self.dtype,
                checkpoint_interval=self.cfg.parallel.activation_checkpoint_interval,
            )
            m["backward"] = accumulation_buffers(
                self.hf_config, any(g.layer_trained(i) for i in layers), self.batch.grad_accum, self.dtype
            )
            m["total"] += m["activations"] + m["backward"]
            out.append(m)
        return out

    def in_flight(self, s: int) -> int:
        """Micro-batches stage s holds activations for at once: 1F1B runs up to P - s forward passes
        before its first backward, and no more than a step's micro-batches."""
        return max(1, min(self.num_stages - s, self.batch.grad_accum))

    def record(self) -> dict:
        """What run.json holds (rundir writes it, prefixed with the format version).

        Its paths are absolute (config.resolve_paths) and `run_dir` is where it was written, so
        export, transplant, chat vector and a resume find the base model, tokenizer and data from
        any folder, however the paths were spelled, and relative to the run directory when a
        project folder is moved whole (convert/sources.py)."""
        flat = self.cfg.flat()
        flat["tokenizer"] = self.cfg.model.tokenizer or self.cfg.model.model
        if flat.get("ds_config") != "auto":
            flat["ds_config"] = str(self.ds_path)
        return {
            "config": resolve_paths(flat),
            "run_dir": str(Path(self.cfg.schedule.out).resolve()),
            "phase": self.cfg.groups.phase,
            "groups": self.groups.to_record(),
            "base_model": self.base_model,
            "stages": [[self.stages[s], self.stages[s + 1]] for s in range(self.num_stages)],
            "world_size": self.world_size,
            "batch": vars(self.batch),
            "ds_config": self.ds_config,
            "clipping": "global norm over the pipeline stages, by the engine's AdamW"
            if self.clips_globally
            else "DeepSpeed's",
            # What the trained model must ship: export, transplant and chat vector read it here.
            "chat_template": self.chat_template,
        }

    def layer_map(self) -> str:
        """The table printed at the start of training: what trains, where."""
        g = self.groups
        rows = [f"{'layers':<16}{'group':<8}{'stage':<7}{'params':>12}  state"]

        def state(name):
            return "trained" if g.trains(name) else "frozen"

        emb = EMBED_WEIGHT
        rows.append(
            f"{'embeddings':<16}{g.group_of(emb):<8}{self.stage_of_layer(0):<7}{self.numel([emb]):>12,}  {state(emb)}"
        )
        i = 0
        while i < g.num_layers:  # consecutive layers with the same group and stage share one row
            j = i
            while (
                j + 1 < g.num_layers
                and g.group_of_layer(j + 1) == g.group_of_layer(i)
                and self.stage_of_layer(j + 1) == self.stage_of_layer(i)
            ):
                j += 1
            rng = f"{i}" if i == j else f"{i}-{j}"
            n = self.numel([k for k in self.shapes if layer_of(k) in range(i, j + 1)])
            st = "trained" if g.layer_trained(i) else "frozen"
            rows.append(f"{'layers.' + rng:<16}{g.group_of_layer(i):<8}{self.stage_of_layer(i):<7}{n:>12,}  {st}")
            i = j + 1
        last = self.stage_of_layer(g.num_layers - 1)
        norm = [k for k in self.shapes if k.startswith(NORM)]
        rows.append(f"{'norm':<16}{FORMAT:<8}{last:<7}{self.numel(norm):>12,}  {state(norm[0])}")
        if g.tied:
            head = "trained" if g.trains(HEAD_WEIGHT) else "frozen (tied to the embeddings)"
            rows.append(f"{'lm_head':<16}{FROZEN:<8}{last:<7}{'(tied)':>12}  {head}")
        else:
            rows.append(
                f"{'lm_head':<16}{FORMAT:<8}{last:<7}{self.numel(['lm_head.weight']):>12,}  {state('lm_head.weight')}"
            )
        rows.append(self.batch.describe() + f"; {self.num_stages} pipeline stage(s), bounds {self.stages}")
        gb = lambda b: f"{b / 2**30:.2f} GiB" if b >= 2**28 else f"{b / 2**20:.1f} MiB"
        for s, m in enumerate(self.memory_per_stage()):
            k = self.in_flight(s)
            rows.append(
                f"stage {s}: {gb(m['total'])} per rank at peak (weights {gb(m['weights'])}, gradients "
                f"{gb(m['gradients'])}, optimizer {gb(m['optimizer'])}, activations {gb(m['activations'])} "
                f"for {k} micro-batch{'es' if k > 1 else ''} in flight"
                + (f", backward buffers {gb(m['backward'])})" if m["backward"] else ")")
            )
        rows.extend(self.validation_lines())
        if self.chat_template:
            t = self.chat_template
            rows.append(
                f"chat template: the one {Path(t['manifest']).name} was rendered with ({t['from']}; sha256 "
                f"{t['sha256'][:12]}); export, transplant and chat vector ship it"
            )
        return "\n".join(rows)

    def validation_lines(self) -> list[str]:
        every = self.cfg.eval.eval_every
        if not every:
            return ["validation: off (eval_every 0)"]
        rows = [
            f"validation every {every} steps, before the first and after the last"
            + (f"; {self.eval_note}" if self.eval_note else "")
        ]
        for e in self.evals:
            rows.append(
                f"  {e.key}: {e.batches} x {self.batch.global_batch} sequences of {e.what}"
                + (f" ({e.note})" if e.note else "")
            )
        return rows


def stage_memory(params: int, trained: int, dtype, zero_stage: int, dp: int) -> dict:
    """What one rank of a stage holds, in bytes, before activations (`stage_activations`).

    weights    every parameter of the stage in the training dtype (frozen ones too: forward needs them)
    gradients  trained parameters only, kept in fp32 by DeepSpeed's optimizers (bf16 runs included)
    optimizer  trained parameters only: Adam's two fp32 moments, plus an fp32 master copy when the
               weights are not fp32 or ZeRO-1 flattens them; ZeRO-1 splits all of it over the
               data-parallel ranks. A frozen parameter has no state at all (make bench checks it).
    """
    import torch

    width = torch.empty(0, dtype=dtype).element_size()
    master = 4 if (width != 4 or zero_stage >= 1) else 0
    optimizer = trained * (8 + master) / (dp if zero_stage >= 1 else 1)
    m = {"weights": params * width, "gradients": trained * 4, "optimizer": int(optimizer)}
    m["total"] = sum(m.values())
    return m


# What one decoder layer keeps for backward, by what the layer does: the tensors autograd saves
# in transformers' Llama/Qwen2/Mistral layer with sdpa attention (no seq^2 term), counted with
# saved_tensors_hooks on CPU (tests/test_memory.py checks the count on the pipeline's own layers).
# A trained layer keeps every linear layer's input for its weight gradient; a frozen layer that
# gradients pass through keeps only what the input gradient needs; a frozen layer below every
# trained one keeps none.
TRAINED, BACKPROP, FORWARD = "trained", "backprop", "forward"


def activation_kind(groups: LayerGroups, i: int) -> str:
    if groups.layer_trained(i):
        return TRAINED
    return BACKPROP if i > groups.first_trained_layer else FORWARD


def layer_activation_values(
    hf_config: dict, kind: str, tokens: int, positions: int, first: bool = False, last: bool = False
) -> int:
    """Values one layer of `kind` keeps from its forward pass until its backward, for `tokens`
    tokens in sequences of `positions`. `first`: the lowest trained layer, whose input needs no
    gradient (one norm input fewer). `last`: the last layer, which adds the final norm's input."""
    h, i = hf_config["hidden_size"], hf_config["intermediate_size"]
    heads = hf_config["num_attention_heads"]
    hd = hf_config.get("head_dim") or h // heads
    q, kv = heads * hd, hf_config.get("num_key_value_heads", heads) * hd
    if kind == FORWARD:
        return 0
    # q and the attention's output, k and v, its logsumexp, two norms' 1/rms; cos and sin per position
    attention = 2 * q + 2 * kv + heads + 2
    if kind == TRAINED:  # MLP: 4 x intermediate; the inputs of the norms and projections: 6 x hidden
        per_token = 4 * i + 6 * h + attention - (h + 1 if first else 0)
    else:  # MLP: 3 x intermediate; 2 x hidden
        per_token = 3 * i + 2 * h + attention
    if last:
        per_token += h + 1 + (h if kind == TRAINED else 0)  # the final norm's input; a trained head's input
    return tokens * per_token + positions * 2 * hd


def stage_activations(
    hf_config: dict,
    layers: list[tuple[str, bool]],
    last: bool,
    tokens: int,
    positions: int,
    in_flight: int,
    dtype,
    checkpoint_interval: int = 0,
) -> int:
    """Bytes of activations one rank of a stage holds at its peak.

    `layers`: (kind, is the lowest trained layer) for each layer of the stage. Each of the
    `in_flight` micro-batches of `tokens` tokens keeps what its layers saved
    (`layer_activation_values`), in the training dtype. With activation checkpointing every N
    layers, a micro-batch keeps one hidden state per chunk of N layers instead, and backward
    recomputes one chunk at a time. The last stage adds the loss of the micro-batch in backward:
    the log-softmax autograd keeps (fp32), its gradient (fp32) and the logits' (training dtype),
    vocab values per token each.
    """
    import torch

    width = torch.empty(0, dtype=dtype).element_size()
    n = len(layers)
    per_layer = [
        layer_activation_values(hf_config, kind, tokens, positions, first, last and j == n - 1)
        for j, (kind, first) in enumerate(layers)
    ]
    if checkpoint_interval:
        chunks = [per_layer[j : j + checkpoint_interval] for j in range(0, n, checkpoint_interval)]
        kept = in_flight * tokens * hf_config["hidden_size"] * sum(1 for c in chunks if any(c))
        values = kept + max((sum(c) for c in chunks), default=0)
    else:
        values = in_flight * sum(per_layer)
    backprop = any(kind != FORWARD for kind, _ in layers)
    loss = tokens * hf_config["vocab_size"] * (8 + width) if last and backprop else 0
    return values * width + loss


def accumulation_buffers(hf_config: dict, trains: bool, grad_accum: int, dtype) -> int:
    """Bytes backward allocates on top of the gradients when it accumulates: each micro-batch after
    the first computes every weight's gradient into a new tensor before adding it to the kept one,
    and a layer's MLP matrices (3 x hidden x intermediate) are in flight together (measured on
    transformers' Llama layer; bench/results/stage_memory_trace.md)."""
    import torch

    if not trains or grad_accum < 2:
        return 0
    return 3 * hf_config["hidden_size"] * hf_config["intermediate_size"] * torch.empty(0, dtype=dtype).element_size()


# ---------------------------------------------------------------------------------------------
# Stages that follow the groups


def layer_cost(groups: LayerGroups, i: int) -> float:
    if groups.layer_trained(i):
        return COST_TRAINED
    return COST_BACKPROP if i > groups.first_trained_layer else COST_FORWARD


def _best_split(costs: tuple[float, ...], parts: int) -> tuple[float, tuple[int, ...]]:
    """Contiguous split of `costs` into `parts` non-empty pieces minimising the largest piece."""

    @lru_cache(maxsize=None)
    def solve(start: int, k: int) -> tuple[float, tuple[int, ...]]:
        if k == 1:
            return sum(costs[start:]), (start,)
        best = (float("inf"), ())
        for cut in range(start + 1, len(costs) - k + 2):
            head = sum(costs[start:cut])
            if head >= best[0]:
                break
            tail, bounds = solve(cut, k - 1)
            cand = (max(head, tail), (start,) + bounds)
            if cand[0] < best[0]:
                best = cand
        return best

    return solve(0, parts)


def partition(groups: LayerGroups, stages: int) -> list[int]:
    """Stage boundaries [0, b1, ..., L] for 1 <= stages <= L layers. With two or more stages the
    raw/format boundary is always a stage boundary (the groups never share a stage, or its ZeRO-1
    optimizer state); within that rule stages are balanced by layer cost."""
    L, f = groups.num_layers, groups.format_start
    if stages == 1:
        return [0, L]
    costs = tuple(layer_cost(groups, i) for i in range(L))
    best = None
    # Give k stages to the layers below format_start and the rest to the format group; try every k.
    for k in range(max(1, stages - (L - f)), min(f, stages - 1) + 1):
        lo_cost, lo = _best_split(costs[:f], k)
        hi_cost, hi = _best_split(costs[f:], stages - k)
        cand = (max(lo_cost, hi_cost), list(lo) + [f + b for b in hi] + [L])
        if best is None or cand[0] < best[0]:
            best = cand
    return best[1]


# ---------------------------------------------------------------------------------------------
# Building the plan


def batch_plan(cfg: RunConfig, world_size: int) -> BatchPlan:
    P = cfg.parallel.pipeline_stages
    if world_size % P:
        where = cfg.where.get("pipeline_stages", "config")
        ranks = "1 process" if world_size == 1 else f"world size {world_size}"
        raise UserError(
            f"{where}: `pipeline_stages` ({P}) needs a multiple of {P} ranks, but this is {ranks}. "
            f"Either run it with --pipeline_stages=1 (or a divisor of {world_size}), or launch "
            f"{P}k ranks, e.g. `deepspeed --num_gpus {P} --module pipeline.train CONFIG`"
        )
    dp = world_size // P
    G, m = cfg.data.global_batch_size, cfg.data.micro_batch_size
    if G % (m * dp):
        raise UserError(
            f"{cfg.where.get('global_batch_size', 'config')}: `global_batch_size` ({G}) must be a "
            f"multiple of micro_batch_size x data-parallel size ({m} x {dp} = {m * dp}) so every step "
            f"sees the same {G} sequences on any world size"
        )
    return BatchPlan(G, m, dp, G // (m * dp))


def _check_tokenizer_dir(cfg: RunConfig) -> Path:
    tok = Path(cfg.model.tokenizer or cfg.model.model)
    key = "tokenizer" if cfg.model.tokenizer else "model"
    from data_prep.tokenizer import TOKENIZER_FILES

    if not (tok.is_file() and tok.suffix == ".model") and not any((tok / n).is_file() for n in TOKENIZER_FILES):
        raise UserError(
            f"{cfg.where.get(key, 'config')}: `{key}` {tok} holds no tokenizer files, so the run could not ship "
            f"one (an exported model would have no tokenizer and no chat template); set `tokenizer:` "
            f"to the tokenizer directory the data was packed with"
        )
    return tok


class PackingCheck:
    """Was a manifest packed for this model? Same vocabulary, same tokenizer (loaded once)."""

    def __init__(self, cfg: RunConfig, hf_config: dict, tokenizer_dir: Path):
        self.cfg, self.hf_config, self.tokenizer_dir, self.mine = cfg, hf_config, tokenizer_dir, None

    def __call__(self, where: str, path: str, w: TokenWindows) -> None:
        from data_prep.tokenizer import encoding_sha256, load_tokenizer, tokenizer_identity

        if w.vocab_size > self.hf_config["vocab_size"]:
            raise UserError(
                f"{where}: {path} was tokenized with a vocabulary of {w.vocab_size}, larger than the "
                f"model's vocab_size {self.hf_config['vocab_size']} ({self.cfg.model.model}/config.json)"
            )
        packed = w.manifest.get("tokenizer") or {}
        if self.mine is None:
            tok = load_tokenizer(self.tokenizer_dir, flag="`tokenizer`")
            self.mine = {"encoding_sha256": encoding_sha256(tok)}
            if "encoding_sha256" not in packed:  # manifests written before it was recorded
                self.mine["sha256"] = tokenizer_identity(self.tokenizer_dir, tok)["sha256"]
        elif "encoding_sha256" not in packed and "sha256" not in self.mine:
            self.mine["sha256"] = tokenizer_identity(self.tokenizer_dir)["sha256"]
        key = "encoding_sha256" if "encoding_sha256" in packed else "sha256"
        if packed.get(key) != self.mine.get(key):
            tok_dir = self.tokenizer_dir
            raise UserError(
                f"{where}: {path} was packed with the tokenizer {packed.get('path')!r}, which encodes text "
                f"differently from this run's tokenizer {str(tok_dir)!r} (manifest tokenizer.{key} "
                f"differs), so its token ids would mean other tokens. Repack the data with "
                f"`--tokenizer {tok_dir}`, or set `tokenizer:` to the one it was packed with"
            )


def data_template(cfg: RunConfig, data: Mixture) -> dict | None:
    """The chat template the run's chat data was rendered with (from its manifests): the format the
    trained model learns, so the one it must ship. None when the run trains on no chat data. Chat
    sources rendered with different templates are refused: the model would learn two formats and
    could ship only one."""
    from data_prep.template import manifest_template

    where = f"{cfg.where.get('data', 'config')}: `data`"
    found = [
        (path, t)
        for (path, _), w in zip(data_sources(cfg.data.data, where), data.sources)
        if (t := manifest_template(w.manifest)) is not None
    ]
    for path, t in found[1:]:
        if t["sha256"] != found[0][1]["sha256"]:
            raise UserError(
                f"{where}: {found[0][0]} and {path} were rendered with different chat templates "
                f"(manifest chat_template_sha256 {found[0][1]['sha256'][:12]} vs {t['sha256'][:12]}); "
                f"the model would learn two formats and ship one. Repack one of them with the other's "
                f"template (`python -m data_prep chat --chat-template FILE`)"
            )
    if not found:
        return None
    path, t = found[0]
    return {**t, "manifest": str(Path(path).resolve())}


def check_data(
    cfg: RunConfig, hf_config: dict, tokenizer_dir: Path, data: Mixture, packing: PackingCheck | None = None
) -> None:
    """Does the data fit the model and the phase? Same vocabulary, same tokenizer, the right kind."""
    where = f"{cfg.where.get('data', 'config')}: `data`"
    packing = packing or PackingCheck(cfg, hf_config, tokenizer_dir)
    sources = list(zip(data_sources(cfg.data.data, where), data.sources))
    # Chat shards mixed with raw text in phase `raw` are replay (only their assistant tokens count,
    # the raw text's every token); chat shards alone are a phase mix-up.
    any_raw_text = any(w.manifest.get("kind") != "chat" for _, w in sources)
    for (path, _), w in sources:
        packing(where, path, w)
        if cfg.groups.phase == "raw" and w.manifest.get("kind") == "chat" and not any_raw_text:
            raise UserError(
                f"{where}: {path} holds chat conversations, but phase `raw` trains on raw text (every "
                f"token); pack the text with `python -m data_prep raw` (chat data mixed with raw text "
                f"is accepted, as replay)"
            )
    if cfg.groups.phase == "chat" and not data.has_mask:
        raise UserError(
            f"{where}: phase `chat` needs chat shards with a loss mask (made by `python -m data_prep chat`)"
        )


def _capacity(data) -> tuple[int, TokenWindows]:
    """Samples a set yields before any window comes twice, and the source that limits it."""
    if isinstance(data, TokenWindows):
        return len(data), data
    # Source k fills counts[k] of every MIX_BLOCK samples.
    return min(((len(w) * MIX_BLOCK // int(c), w) for w, c in zip(data.sources, data.counts)), key=lambda x: x[0])


def _eval_set(cfg: RunConfig, key: str, what: str, data, global_batch: int, where: str, drop: str) -> EvalSet:
    capacity, limit = _capacity(data)
    if capacity < global_batch:
        raise UserError(
            f"{where}: {limit.path} has {len(limit)} windows of seq_len {cfg.data.seq_len} in its "
            f"{limit.split!r} split, too few for one validation batch of global_batch_size "
            f"{global_batch} sequences"
            + (" (its share of the mix)" if isinstance(data, Mixture) else "")
            + f"; pack it with a larger --val-fraction, or {drop}"
        )
    batches = min(cfg.eval.eval_batches, capacity // global_batch)
    note = (
        f"its {capacity} windows hold {batches} of the {cfg.eval.eval_batches} batches asked for"
        if batches < cfg.eval.eval_batches
        else ""
    )
    return EvalSet(key, what, data, batches, note)


def eval_plan(cfg: RunConfig, data: Mixture, global_batch: int, packing: PackingCheck) -> tuple[list[EvalSet], str]:
    """The sets validated during training (empty when `eval_every` is 0) and a note on the own set."""
    if not cfg.eval.eval_every:
        return [], ""
    S, seed, verify = cfg.data.seq_len, cfg.schedule.seed, cfg.data.verify_data
    sources = data_sources(cfg.data.data)
    has_val = [
        (path, weight)
        for (path, weight), t in zip(sources, data.sources)
        if any(r["split"] == "val" and r["tokens"] for r in t.manifest["shards"])
    ]
    sets, note = [], ""
    where = f"{cfg.where.get('data', 'config')}: `data`"
    if has_val:
        windows = [
            TokenWindows(path, split="val", seq_len=S, seed=seed + i, verify=verify)
            for i, (path, _) in enumerate(has_val)
        ]
        own = windows[0] if len(windows) == 1 else Mixture(windows, [w for _, w in has_val], seed)
        names = ", ".join(Path(p).name for p, _ in has_val)
        sets.append(
            _eval_set(
                cfg,
                "val_loss",
                f"the val split of {names}",
                own,
                global_batch,
                where,
                "turn validation off (`eval_every: 0`)",
            )
        )
        if len(has_val) < len(sources):
            note = "the run's own set holds only the sources with a val split"
    else:
        note = "the data has no val split, so the run's own set is not validated" + (
            "" if cfg.eval.eval_data else " (and no `eval_data` is given: nothing is)"
        )
    where = f"{cfg.where.get('eval_data', 'config')}: `eval_data`"
    for name, (path, split) in eval_sources(cfg.eval.eval_data, where).items():
        w = TokenWindows(path, split=split, seq_len=S, seed=seed, verify=verify)
        packing(f"{where}.{name}", path, w)
        sets.append(
            _eval_set(
                cfg,
                f"val_loss_{name}",
                f"the {split} split of {Path(path).name}",
                w,
                global_batch,
                f"{where}.{name}",
                f"drop `{name}` from `eval_data`",
            )
        )
    return sets, note


def check_monitors(cfg: RunConfig) -> list[str]:
    """`report_to`, with each monitor's package importable (checked here, not deep inside DeepSpeed)."""
    import importlib.util

    where = cfg.where.get("report_to", "config")
    wanted = report_to(cfg.monitor.report_to, where)
    for name, module in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        if name in wanted and importlib.util.find_spec(module) is None:
            raise UserError(
                f"{where}: `report_to` has {name}, but the `{module}` package is not installed; "
                f"`pip install 'layer-aware[monitor]'` (or `pip install {module}`)"
            )
    return wanted


def build_plan(cfg: RunConfig, world_size: int, use_gpu: bool | None = None) -> RunPlan:
    """Every check that needs no other rank, in the order a user would fix them."""
    import torch

    if use_gpu is None:
        use_gpu = torch.cuda.is_available()
    out = Path(cfg.schedule.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{cfg.where.get('out', 'config')}: `out` {out} exists and is not a directory")
    # Before DeepSpeed starts: a read-only `out`, or one another training holds, would otherwise fail
    # on rank 0 only, once every rank is up.
    check_writable(out, f"{cfg.where.get('out', 'config')}: `out`", inside=True)
    RunDir(out).check_free()
    model_dir = Path(cfg.model.model)
    hf_config = hf.read_config(model_dir)
    hf.check_architecture(hf_config, str(model_dir))
    weights = hf.weight_map(model_dir, flag=f"{cfg.where.get('model', 'config')}: `model`")
    tokenizer_dir = _check_tokenizer_dir(cfg)
    L = hf_config["num_hidden_layers"]
    max_pos = hf_config.get("max_position_embeddings")
    if max_pos and cfg.data.seq_len > max_pos:
        raise UserError(
            f"{cfg.where.get('seq_len', 'config')}: `seq_len` ({cfg.data.seq_len}) exceeds the model's "
            f"max_position_embeddings ({max_pos}) in {model_dir}/config.json"
        )
    g = cfg.groups
    tied = tied_embeddings(hf_config)
    groups = LayerGroups.resolve(g.raw_start, g.format_start, L, tied, g.phase, g.raw_trains_format, cfg.where)
    P = cfg.parallel.pipeline_stages
    if P > L:
        raise UserError(
            f"{cfg.where.get('pipeline_stages', 'config')}: `pipeline_stages` ({P}) is more than the model's {L} layers"
        )
    if tied and groups.embeddings_trained and P > 1:
        raise UserError(
            f"{cfg.where.get('phase', 'config')}: `phase: {g.phase}` with tied embeddings needs "
            f"`pipeline_stages: 1`: the shared matrix would live on the first and last stage and train "
            f"in two places"
        )
    batch = batch_plan(cfg, world_size)
    ds_raw, ds_path = deepspeed_json.load(cfg, use_gpu)
    ds = deepspeed_json.merged(
        ds_raw,
        cfg,
        batch.global_batch,
        batch.micro_batch,
        batch.grad_accum,
        batch.dp_size,
        monitors=check_monitors(cfg),
    )
    data = open_mixture(
        data_sources(cfg.data.data, cfg.where.get("data", "config")),
        cfg.data.seq_len,
        cfg.schedule.seed,
        cfg.data.verify_data,
    )
    packing = PackingCheck(cfg, hf_config, tokenizer_dir)
    check_data(cfg, hf_config, tokenizer_dir, data, packing)
    evals, eval_note = eval_plan(cfg, data, batch.global_batch, packing)
    plan = RunPlan(
        evals=evals,
        eval_note=eval_note,
        cfg=cfg,
        model_dir=model_dir,
        tokenizer_dir=tokenizer_dir,
        hf_config=hf_config,
        base_model=hf.model_identity(model_dir, hf_config),
        weights=weights,
        shapes=hf.expected_tensors(hf_config),
        groups=groups,
        world_size=world_size,
        stages=partition(groups, P),
        batch=batch,
        ds_config=ds,
        ds_path=ds_path,
        dtype=deepspeed_json.training_dtype(ds),
        data=data,
        chat_template=data_template(cfg, data),
    )
    # A resume its run.json would refuse (another `steps`, another base) fails here, not once DeepSpeed is up.
    RunDir(out).check_resume(plan.record(), RESUMABLE)
    return plan
