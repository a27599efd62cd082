"""Parameter-efficient fine-tuning: LoRA adapters for any model family; prompt and prefix tuning for decoders.

LoRA: wrap chosen linear layers, train only the low-rank factors, merge.

    cfg = LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"])
    wrapped = apply_lora(model, cfg)          # names of the wrapped nn.Linear modules; base frozen
    ... train: only parameters with requires_grad (the lora_A / lora_B factors) need the optimizer ...
    state = lora_state_dict(model)            # just the adapter: {"blocks.0.attn.q_proj.lora_A.weight": ...}
    merge_lora(model)                         # fold B @ A into the weights, unwrap: a plain model again

A wrapped layer computes ``W x + b + scaling * B (A dropout(x))`` with A (r, in) drawn Kaiming-uniform
(a = sqrt(5), nn.Linear's own init) and B (out, r) zero, so a fresh adapter leaves the model's outputs
unchanged; ``scaling`` is alpha / r, or alpha / sqrt(r) with ``use_rslora`` (rank-stabilised LoRA).
These are the conventions of the ``peft`` library, and the factors are named ``lora_A`` / ``lora_B`` as
there, so an adapter moves between the two with a renaming of module paths only
(lmstack.interop.peft_adapters does that, and the file layout).

``target_modules`` follows peft's rule: a list matches a module whose dotted name equals an entry or
ends with ``.`` + entry (``"q_proj"`` matches every layer's query projection; a full name matches one
module); a single string is a regular expression that must match the whole name. Only ``nn.Linear``
modules are wrapped. The projection names shared by every family are ``q_proj``, ``k_proj``, ``v_proj``,
``o_proj`` (attention; T5 also has ``cross_attn.*``), ``gate_proj`` (GLU activations only),
``up_proj``, ``down_proj`` (MLP), ``router`` (MoE) and ``lm_head``.

A wrapper keeps the base layer's ``weight`` and ``bias`` under their own names, so the model's base
state-dict keys do not change; the adapter adds ``<module>.lora_A.weight`` and ``<module>.lora_B.weight``.

LoRA over a quantized base (QLoRA-style, Dettmers et al., 2023, with this package's int8 / int4 formats
rather than NF4 and double quantization):

    quantize_model(model, "int4", keep_shared=True)   # lmstack.models.quant: frozen int8 / int4 buffers
    apply_lora(model, cfg)                   # wraps quantized layers too; the factors are fp32 Parameters
    ... train: only the factors have gradients and optimizer state ...
    merge_lora(model); dequantize_model(model)           # a plain float model again

Over a quantized layer the wrapper keeps the layer as ``base_layer`` (state keys
``<module>.base_layer.qweight`` ...) and its backward reaches the input through the frozen weight
(``grad_x = grad_y @ dequant(W)``, lmstack.models.quant). Merging adds ``scaling * B @ A`` to the
*dequantized* weight, as peft does for its quantized layers: the merged model computes what the
adapter was trained on (up to the quantized kernels' bf16 activations on CPU), not the original float
weights plus the adapter. ``keep_shared`` leaves a tied output head as the float matrix it shares with
the embedding, so merging writes one matrix.

Caveats: only linear layers are supported (no embeddings, no convolutions, no DoRA, no per-module rank or
alpha patterns, no trainable biases); one adapter per model at a time. A tied ``lm_head`` shares its
matrix with the token embedding, so merging an adapter on it changes the embedding too (as it would in
peft with tied weights). Save a checkpoint only after :func:`merge_lora`: the wrapped model's state
dict carries the factor tensors that a plain model of the family does not have. Merging in low precision
rounds: the sum is formed in fp32 and cast back once, but a bf16 weight still keeps only bf16's digits.

Prompt tuning (Lester et al., 2021): N trainable "virtual token" vectors go before every input of a decoder
whose weights stay frozen.

    tuned = apply_prompt_tuning(model, PromptTuningConfig(num_virtual_tokens=8, init="text",
                                                          init_text="Answer the question:"), tokenizer)
    logits, loss = tuned(idx, targets)        # same contract as the model; only tuned.prompt trains
    state = prompt_tuning_state_dict(tuned)   # {"prompt_embeddings": (N, C)}
    generate(tuned, prompt_ids, use_kv_cache=False)   # lmstack.engine.generate, recomputing each step

The wrapper hands the vectors to the model's ``prefix_embeddings`` argument (gpt and moe families): they
take positions 0..N-1 and the real tokens N..N+T-1, exactly as if N extra tokens had been typed first, so
a prompt initialised from a text's token embeddings behaves like that text. Logits and loss cover the real
tokens only (the virtual positions have no targets). ``tuned.config`` is the base config with
``block_size`` reduced by N, the context left for real tokens. The vectors are stored in fp32 and cast to
the model's dtype in the forward pass. Initialisation: ``random`` draws N(0, s) with s the standard
deviation of the token-embedding matrix; ``vocab`` copies the embeddings of N random vocabulary ids
(uniform over the whole vocabulary, not the paper's most frequent 5,000); ``text`` copies the embeddings of
the tokenized ``init_text``, repeated or cut to N. Caveats: no KV cache (generation recomputes the whole
sequence each step, so it is slow for long outputs), no packed rows, explicit positions or prefix-LM
``prefix_len``.

Prefix tuning (Li & Liang, 2021): every attention layer also attends to N trainable key and value vectors
per KV head, ``prefix_keys`` / ``prefix_values`` (L, H_kv, N, D), the base frozen.

    tuned = apply_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=8))   # init: vocab | text
    state = prefix_tuning_state_dict(tuned)   # {"prefix_keys": ..., "prefix_values": ...}

The prefixes reach the model through the KV-cache protocol of models/layers.py (a cache that holds them at
positions 0..N-1, the real tokens following at N..N+T-1), so no model code knows about them. They start as
the keys and values the frozen model computes for N vocabulary ids or for the init text, so a fresh prefix
acts exactly like typing those tokens (the paper found initialising from real words' activations more
stable). The keys are trained after the rotary encoding, free vectors as in the paper; there is no MLP
reparameterisation. Caveats as for prompt tuning (no KV cache in generation, no packing, positions or
prefix_len), and with sliding-window attention far tokens no longer see the prefix in windowed layers.
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch
import torch.nn as nn

from lmstack.errors import ConfigError, ConversionError
from lmstack.models.quant import QUANTIZED_LINEARS, Int4Linear, Int8Linear, float_linear

LORA_SUFFIXES = ("lora_A.weight", "lora_B.weight")


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # a list of module names / name suffixes, or one regular expression matched against whole names
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    use_rslora: bool = False  # scaling alpha / sqrt(r) instead of alpha / r

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def validate(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"lora.r={self.r!r} must be an integer >= 1 (the adapter's rank, e.g. 8)")
        if not self.alpha > 0:
            raise ConfigError(f"lora.alpha={self.alpha!r} must be > 0 (e.g. 2 * lora.r)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout={self.dropout!r} must be in [0, 1)")
        targets = self.target_modules
        if isinstance(targets, str):
            try:
                re.compile(targets)
            except re.error as e:
                raise ConfigError(f"lora.target_modules={targets!r} is not a valid regular expression: {e}") from None
        elif not targets or not all(isinstance(t, str) and t for t in targets):
            raise ConfigError(f"lora.target_modules={targets!r}: give module names such as ['q_proj', 'v_proj'] "
                              "or one regular expression")

    def matches(self, module_name: str) -> bool:
        """peft's rule: a regex fully matches the name, or a list entry equals it or is its dotted suffix."""
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, module_name) is not None
        return any(module_name == t or module_name.endswith("." + t) for t in self.target_modules)


class LoRALinear(nn.Module):
    """An nn.Linear (in -> out) plus a trainable low-rank update scaling * B @ A, B (out, r) and A (r, in).

    Over a float layer the base ``weight`` (out, in) and ``bias`` (out,) are the original Parameter objects
    (tied matrices stay tied), frozen, and the factors take the weight's dtype. Over a quantized layer
    (lmstack.models.quant, QLoRA-style) the layer itself is kept as ``base_layer`` and the factors are fp32."""

    def __init__(self, base: nn.Linear | Int8Linear | Int4Linear, r: int, scaling: float, dropout: float):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        if isinstance(base, QUANTIZED_LINEARS):
            self.base_layer = base  # int8 / int4 buffers (no gradient, no optimizer state) and a frozen bias
            self.weight = self.bias = None
            base.requires_grad_(False)
            factory = {"device": base.qweight.device, "dtype": torch.float32}
        else:
            self.base_layer = None
            self.weight = base.weight  # (out, in)
            self.bias = base.bias  # (out,) or None
            self.weight.requires_grad_(False)
            if self.bias is not None:
                self.bias.requires_grad_(False)
            factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)  # weight (r, in)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)  # weight (out, r)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = scaling
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.base_layer is not None:
            base = self.base_layer(x)  # (..., out); backward reaches x through the frozen quantized weight
        else:
            base = nn.functional.linear(x, self.weight, self.bias)  # (..., out)
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))  # (..., out)
        return base + (update * self.scaling).to(base.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in fp32, (out, in)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain nn.Linear holding W + scaling * B @ A (summed in fp32, cast back to W's dtype).

        The merge writes into the base Parameter in place, so a matrix tied elsewhere sees it too. Over a
        quantized layer W is the dequantized weight, and the result takes the dtype it was quantized from."""
        if self.base_layer is not None:
            with torch.no_grad():
                layer = self.base_layer
                weight = (layer.dequantized(torch.float32) + self.delta_weight()).to(layer.weight_dtype)
                return float_linear(weight, layer.bias)
        with torch.no_grad():
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta")
        linear.weight = self.weight
        if self.bias is not None:
            linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"r={self.lora_A.out_features}, scaling={self.scaling:g}"
                f"{'' if self.base_layer is None else ', quantized base'}")


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The wrapped layers of ``model`` by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def linear_layers(model: nn.Module) -> list[str]:
    """Names of the layers LoRA can wrap: nn.Linear and the quantized linears of lmstack.models.quant."""
    return [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, *QUANTIZED_LINEARS))]


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Wrap every linear layer (float or quantized) whose name matches ``cfg.target_modules``, freeze every
    base parameter, and return the wrapped module names. ConfigError when no module matches or the model
    already has LoRA."""
    cfg.validate()
    if lora_modules(model):
        raise ConfigError("the model already has LoRA layers; merge_lora(model) or build a fresh model first")
    linears = linear_layers(model)
    targets = [name for name in linears if cfg.matches(name)]
    if not targets:
        leaves = sorted({name.rsplit(".", 1)[-1] for name in linears})
        raise ConfigError(f"lora.target_modules={cfg.target_modules!r} matches no linear layer of this model; "
                          f"its linear layers are named {', '.join(leaves)} (e.g. {linears[0] if linears else '-'})")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in targets:
        _set_submodule(model, name, LoRALinear(model.get_submodule(name), cfg.r, cfg.scaling, cfg.dropout))
    return targets


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter factors only: ``<module>.lora_A.weight`` (r, in) and ``<module>.lora_B.weight`` (out, r)."""
    out: dict[str, torch.Tensor] = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A.weight"] = m.lora_A.weight.detach()
        out[f"{name}.lora_B.weight"] = m.lora_B.weight.detach()
    return out


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter factors into a model that :func:`apply_lora` has wrapped the same way.

    ConversionError (one line) when the names or shapes disagree: an adapter for another base model or
    another target set."""
    expected = {k: v.shape for k, v in lora_state_dict(model).items()}
    if not expected:
        raise ConversionError("the model has no LoRA layers; call apply_lora(model, cfg) before loading an adapter")
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ConversionError(f"the adapter does not fit this model: missing {missing[:3]}"
                              f"{' ...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                              f"{' ...' if len(unexpected) > 3 else ''}; was it trained on another base model?")
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(shape)}" for k, shape in expected.items()
           if tuple(state[k].shape) != tuple(shape)]
    if bad:
        raise ConversionError(f"the adapter's shapes do not fit this model (adapter vs model): {'; '.join(bad[:3])}; "
                              "was it trained on another base model or with another rank?")
    modules = lora_modules(model)
    with torch.no_grad():
        for key, tensor in state.items():
            name, factor = key[: -len(".lora_A.weight")], key.rsplit(".", 2)[-2]
            target = getattr(modules[name], factor).weight
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))


def merge_lora(model: nn.Module) -> list[str]:
    """Fold every adapter into its base weight and remove the wrappers; returns the merged module names.

    The merged model has exactly the base model's parameter names again (and they stay frozen: set
    requires_grad yourself to train it further)."""
    merged = []
    for name, m in lora_modules(model).items():
        _set_submodule(model, name, m.merged())
        merged.append(name)
    return merged


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(parameters that require grad, all parameters); a tied matrix counts once."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique if p.requires_grad), sum(p.numel() for p in unique)


# ---------------------------------------------------------------------------------------------- prompt tuning
PROMPT_INITS = ("random", "vocab", "text")
PROMPT_KEY = "prompt_embeddings"


class TextEncoder(Protocol):
    """What ``init="text"`` needs of a tokenizer (lmstack.tokenizer.Tokenizer has it)."""

    def encode(self, text: str) -> list[int]: ...


@dataclass
class PromptTuningConfig:
    num_virtual_tokens: int = 20
    init: str = "random"  # random | vocab | text
    init_text: str | None = None  # the text whose token embeddings start the prompt (init="text")
    seed: int = 0  # for the random and vocab initialisations

    INITS = PROMPT_INITS  # class constant (unannotated, so not a field)

    def validate(self) -> None:
        section = "prompt_tuning" if type(self) is PromptTuningConfig else "prefix_tuning"
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 1:
            raise ConfigError(f"{section}.num_virtual_tokens={self.num_virtual_tokens!r} must be an integer >= 1 "
                              "(e.g. 20)")
        if self.init not in self.INITS:
            raise ConfigError(f"{section}.init={self.init!r}: choose one of {self.INITS}")
        if self.init == "text" and not self.init_text:
            raise ConfigError(f"{section}.init=text needs {section}.init_text (e.g. 'Classify the sentiment:')")


class PromptTuned(nn.Module):
    """A frozen decoder with N trainable input vectors ``prompt`` (N, C) before every sequence.

    ``forward(idx, targets=None, **kw)`` keeps the model's contract (logits (B, T', V) for the real tokens
    and their loss); ``kv_cache`` must be None."""

    def __init__(self, base: nn.Module, prompt: torch.Tensor):
        super().__init__()
        self.base = base
        self.prompt = nn.Parameter(prompt.detach().float().clone())  # (N, C)
        self.num_virtual_tokens = prompt.shape[0]
        self.config = replace(base.config, block_size=base.config.block_size - self.num_virtual_tokens)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, kv_cache=None, **kw):
        if kv_cache is not None:
            raise ConfigError("a prompt-tuned model runs without a KV cache; generate with use_kv_cache=False")
        return self.base(idx, targets, prefix_embeddings=self.prompt[None], **kw)


def _initial_ids(vocab_size: int, cfg: PromptTuningConfig, tokenizer: TextEncoder | None, section: str
                 ) -> torch.Tensor:
    """(N,) token ids the virtual tokens start from: random vocabulary ids, or the init text's ids repeated / cut."""
    n = cfg.num_virtual_tokens
    if cfg.init == "vocab":
        return torch.randint(0, vocab_size, (n,), generator=torch.Generator().manual_seed(cfg.seed))
    if tokenizer is None:
        raise ConfigError(f"{section}.init=text needs the model's tokenizer: apply_{section}(model, cfg, tokenizer)")
    text_ids = list(tokenizer.encode(cfg.init_text))
    if not text_ids:
        raise ConfigError(f"{section}.init_text={cfg.init_text!r} encodes to no tokens; give a longer text")
    return torch.tensor((text_ids * (n // len(text_ids) + 1))[:n])  # repeated, then cut to N


def _initial_prompt(model: nn.Module, cfg: PromptTuningConfig, tokenizer: TextEncoder | None) -> torch.Tensor:
    """(N, C) starting vectors, detached copies of (or drawn to match) the token embeddings."""
    table = model.tok_emb.weight.detach()  # (V, C)
    if cfg.init == "random":
        generator = torch.Generator().manual_seed(cfg.seed)
        return torch.randn(cfg.num_virtual_tokens, table.shape[1], generator=generator) * table.float().std().item()
    ids = _initial_ids(table.shape[0], cfg, tokenizer, "prompt_tuning")
    return table[ids.to(table.device)].float().cpu()


def _check_wrappable(model: nn.Module, cfg: PromptTuningConfig, section: str) -> None:
    """ConfigError unless ``model`` is a plain gpt / moe decoder with room for the virtual tokens."""
    cfg.validate()
    if isinstance(model, (PromptTuned, PrefixTuned)):
        raise ConfigError(f"the model is already wrapped by {type(model).__name__}; use its .base to start over")
    if "prefix_embeddings" not in inspect.signature(model.forward).parameters:
        raise ConfigError(f"{section.replace('_', ' ')} needs a decoder that takes prefix_embeddings (gpt or moe "
                          f"families); {type(model).__name__} does not")
    if cfg.num_virtual_tokens >= model.config.block_size:
        raise ConfigError(f"{section}.num_virtual_tokens={cfg.num_virtual_tokens} leaves no room in the model's "
                          f"context of {model.config.block_size} tokens")


def apply_prompt_tuning(model: nn.Module, cfg: PromptTuningConfig,
                        tokenizer: TextEncoder | None = None) -> PromptTuned:
    """Freeze ``model`` and wrap it with ``cfg.num_virtual_tokens`` trainable virtual tokens (see the module
    docstring). ConfigError (one line) for a model without ``prefix_embeddings`` support (encoders,
    encoder-decoders), a prompt that leaves no context, or a bad config."""
    _check_wrappable(model, cfg, "prompt_tuning")
    prompt = _initial_prompt(model, cfg, tokenizer)
    model.requires_grad_(False)
    return PromptTuned(model, prompt).to(model.tok_emb.weight.device)


def prompt_tuning_state_dict(model: PromptTuned) -> dict[str, torch.Tensor]:
    """The virtual tokens only: ``{"prompt_embeddings": (N, C)}``."""
    return {PROMPT_KEY: model.prompt.detach()}


def load_prompt_tuning_state_dict(model: PromptTuned, state: dict[str, torch.Tensor]) -> None:
    """Copy saved virtual tokens into a wrapper of the same size; ConversionError (one line) on a mismatch."""
    _load_virtual_state(model, state, "prompt_tuning")


def _load_virtual_state(model: nn.Module, state: dict[str, torch.Tensor], section: str) -> None:
    """Copy ``state`` into the wrapper's parameters of the same names; ConversionError (one line) on a mismatch."""
    params = dict(model.named_parameters(recurse=False))  # the wrapper's own: prompt or prefix_keys / values
    names = {PROMPT_KEY: "prompt"} if section == "prompt_tuning" else {k: k for k in params}
    if set(state) != set(names):
        raise ConversionError(f"a {section.replace('_', '-')} state holds {sorted(names)}, this one has "
                              f"{sorted(state)[:3]}")
    for key, name in names.items():
        if tuple(state[key].shape) != tuple(params[name].shape):
            raise ConversionError(f"the saved {key} is {tuple(state[key].shape)} but this model's is "
                                  f"{tuple(params[name].shape)}; apply_{section} with the same num_virtual_tokens "
                                  "on the same base model")
    with torch.no_grad():
        for key, name in names.items():
            params[name].copy_(state[key].to(device=params[name].device, dtype=params[name].dtype))


# ---------------------------------------------------------------------------------------------- prefix tuning
@dataclass
class PrefixTuningConfig(PromptTuningConfig):
    init: str = "vocab"  # vocab | text: the keys and values the frozen model computes for those tokens

    INITS = ("vocab", "text")


class _PrefixCache:
    """The KV-cache protocol of models/layers.py over fixed per-layer prefixes (L, H_kv, N, D): the prefix keys
    sit at positions 0..N-1 and every forward pass is a whole sequence at positions N..N+T-1. With
    ``keys=None`` it records the keys and values the model computes instead (for the initialisation)."""

    def __init__(self, keys: torch.Tensor | None, values: torch.Tensor | None):
        self.keys, self.values = keys, values
        self.n = 0 if keys is None else keys.shape[2]
        self.recorded: list[tuple[torch.Tensor, torch.Tensor]] = []

    def next_position(self) -> int:
        return self.n

    def prepare(self, positions: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, N + T)
        prefix = torch.arange(self.n, device=positions.device).expand(positions.shape[0], -1)
        return torch.cat([prefix, positions], dim=1)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys is None:
            self.recorded.append((k, v))
            return k, v
        B = k.shape[0]
        prefix_k = self.keys[layer_idx].to(k.dtype).expand(B, -1, -1, -1)  # (B, H_kv, N, D)
        prefix_v = self.values[layer_idx].to(v.dtype).expand(B, -1, -1, -1)
        return torch.cat([prefix_k, k], dim=2), torch.cat([prefix_v, v], dim=2)  # (B, H_kv, N + T, D)


class PrefixTuned(nn.Module):
    """A frozen decoder whose every attention layer also attends to N trainable key / value vectors,
    ``prefix_keys`` and ``prefix_values`` (L, H_kv, N, D). Same forward contract as :class:`PromptTuned`."""

    def __init__(self, base: nn.Module, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.base = base
        self.prefix_keys = nn.Parameter(keys.detach().float().clone())  # (L, H_kv, N, D)
        self.prefix_values = nn.Parameter(values.detach().float().clone())  # (L, H_kv, N, D)
        self.num_virtual_tokens = keys.shape[2]
        self.config = replace(base.config, block_size=base.config.block_size - self.num_virtual_tokens)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, kv_cache=None, **kw):
        refused = sorted(k for k in ("positions", "prefix_len", "document_ids") if kw.get(k) is not None)
        if kv_cache is not None or refused:
            raise ConfigError(f"a prefix-tuned model runs whole sequences without a KV cache, positions, prefix_len "
                              f"or document_ids (got {refused or ['kv_cache']}); generate with use_kv_cache=False")
        return self.base(idx, targets, kv_cache=_PrefixCache(self.prefix_keys, self.prefix_values), **kw)


def apply_prefix_tuning(model: nn.Module, cfg: PrefixTuningConfig,
                        tokenizer: TextEncoder | None = None) -> PrefixTuned:
    """Freeze ``model`` and give every attention layer ``cfg.num_virtual_tokens`` trainable key / value vectors,
    initialised to what the model computes for the init tokens (so a fresh prefix acts exactly like typing
    them). ConfigError (one line) as in :func:`apply_prompt_tuning`."""
    _check_wrappable(model, cfg, "prefix_tuning")
    ids = _initial_ids(model.config.vocab_size, cfg, tokenizer, "prefix_tuning")
    recorder = _PrefixCache(None, None)
    was_training = model.training
    with torch.no_grad():  # eval mode: no dropout, and no MoE capacity drops in the recorded activations
        model.eval()(ids[None].to(model.tok_emb.weight.device), kv_cache=recorder, logits_to_keep=1)
    model.train(was_training)
    keys = torch.stack([k[0] for k, _ in recorder.recorded])  # (L, H_kv, N, D)
    values = torch.stack([v[0] for _, v in recorder.recorded])
    model.requires_grad_(False)
    return PrefixTuned(model, keys, values).to(model.tok_emb.weight.device)


def prefix_tuning_state_dict(model: PrefixTuned) -> dict[str, torch.Tensor]:
    """The prefixes only: ``{"prefix_keys": (L, H_kv, N, D), "prefix_values": (L, H_kv, N, D)}``."""
    return {"prefix_keys": model.prefix_keys.detach(), "prefix_values": model.prefix_values.detach()}


def load_prefix_tuning_state_dict(model: PrefixTuned, state: dict[str, torch.Tensor]) -> None:
    """Copy saved prefixes into a wrapper of the same shape; ConversionError (one line) on a mismatch."""
    _load_virtual_state(model, state, "prefix_tuning")
