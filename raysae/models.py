"""Hugging Face causal LMs as raysae sees them: loading, residual-stream hook sites, a forward
truncated above the deepest hooked block, and splicing a function into the residual stream.

Pure torch + transformers. Sites are named the TransformerLens way (`blocks.3.hook_resid_post`)
so SAE folders interoperate with SAELens, but hooks are plain PyTorch hooks on the HF blocks:
`resid_pre` of block i is the block's input, `resid_post` its output. We hook the blocks rather
than use `output_hidden_states`, whose last entry some models return after the final norm.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from raysae.config import ConfigError, DataConfig, ModelConfig, Site, local_path

log = logging.getLogger("raysae.models")

# Where each supported family keeps its list of transformer blocks.
BLOCK_PATHS = (
    "gpt_neox.layers",  # GPT-NeoX / Pythia
    "transformer.h",  # GPT-2
    "model.layers",  # Llama, Gemma, Mistral, Qwen
    "model.language_model.layers",  # multimodal wrappers (Gemma 3)
)
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_post)$")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def hook_name(site: str, layer: int) -> str:
    """TransformerLens name of a site: `blocks.{layer}.hook_{site}`."""
    return f"blocks.{layer}.hook_{site}"


def parse_hook_name(name: str) -> tuple[Site, int]:
    """`blocks.3.hook_resid_post` -> ("resid_post", 3)."""
    m = _HOOK_RE.match(name)
    if not m:
        raise ConfigError(
            f"hook name {name!r} is not supported; expected blocks.<i>.hook_resid_pre "
            "or blocks.<i>.hook_resid_post"
        )
    return m.group(2), int(m.group(1))  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Loading


SHIPPED_CONFIGS = Path(__file__).parent / "model_configs"
"""HF configs of the models the paper configs name (`<org>__<name>.json`): the architecture only,
so that `raysae check` and `raysae plan` work on them without a hub."""


def model_hf_config(cfg: ModelConfig) -> PretrainedConfig:
    """The model's HF config, without loading weights (cheap validation before any work): from
    `from_config`, the hub or a local path, else (no hub, a model the paper configs name) the
    shipped copy."""
    if cfg.from_config is not None:
        return _from_dict(dict(cfg.from_config), "model.from_config")
    return _named_config(cfg.name, cfg.revision, cfg.trust_remote_code)


def pretrained_name(name: str, what: str = "model") -> str:
    """`name` as `from_pretrained` takes it: an existing local folder (`~` expanded), or a hub
    name, which only the hub can check. A path with no folder there is refused here, rather than
    by the hub client's "Repo id must be in the form ..."."""
    path = local_path(name)
    if path is None:
        return name
    if not path.is_dir():
        raise ConfigError(
            f"no {what} folder at {name!r} and not a hub name "
            "(expected an existing folder, or a hub name like 'org/name')"
        )
    return str(path)


@functools.lru_cache(maxsize=16)
def _named_config(name: str, revision: str | None, trust_remote_code: bool) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(
            pretrained_name(name), revision=revision, trust_remote_code=trust_remote_code
        )
    except OSError:
        shipped = SHIPPED_CONFIGS / f"{name.replace('/', '__')}.json"
        if not shipped.is_file():
            raise
        log.warning("%s: no hub and no local copy; using the shipped config %s", name, shipped)
        return _from_dict(json.loads(shipped.read_text()), str(shipped))


def _from_dict(kwargs: dict[str, Any], where: str) -> PretrainedConfig:
    model_type = kwargs.pop("model_type", None)
    if model_type is None:
        raise ConfigError(f"{where}: missing 'model_type' (e.g. 'gpt_neox', 'gpt2')")
    kwargs.pop("architectures", None)
    return AutoConfig.for_model(model_type, **kwargs)


def model_dims(cfg: ModelConfig) -> tuple[int, int]:
    """(number of blocks, d_model) of a model, read from its config."""
    text = model_hf_config(cfg).get_text_config()
    return int(text.num_hidden_layers), int(text.hidden_size)


def load_lm(cfg: ModelConfig, device: str | torch.device = "cpu") -> nn.Module:
    """Load a causal LM by hub name or local path, or build one from a config dict, in eval mode."""
    dtype = _DTYPES[cfg.dtype]
    if cfg.from_config is not None:
        torch.manual_seed(cfg.init_seed)  # every actor must build the same random model
        model = AutoModelForCausalLM.from_config(model_hf_config(cfg), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            pretrained_name(cfg.name),
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            dtype=dtype,
        )
    return model.to(device).eval()


def load_tokenizer(model: ModelConfig, data: DataConfig | None = None) -> Any | None:
    """The data config's tokenizer, else the model's; None when the model has none (token-id
    sources need none: special ids then come from the model config)."""
    name = data.tokenizer if data is not None and data.tokenizer else None
    if name is None and model.from_config is not None:
        return None
    try:
        return AutoTokenizer.from_pretrained(
            pretrained_name(name, "tokenizer") if name else pretrained_name(model.name),
            revision=None if name else model.revision,
            trust_remote_code=model.trust_remote_code,
        )
    except (OSError, ValueError):
        if name is not None:
            raise  # a tokenizer the config names must load
        return None  # a model folder without one: token-id data still works


def get_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks."""
    for path in BLOCK_PATHS:
        mod: Any = model
        for part in path.split("."):
            mod = getattr(mod, part, None)
            if mod is None:
                break
        if isinstance(mod, nn.ModuleList):
            return mod
    raise ValueError(
        f"cannot find the transformer blocks of {type(model).__name__}; "
        f"supported block paths: {', '.join(BLOCK_PATHS)}"
    )


def final_norm(model: nn.Module) -> nn.Module:
    """The norm between the last block's output and the unembedding (LayerNorm or RMSNorm):
    `gpt_neox.final_layer_norm` (GPT-NeoX / Pythia), `transformer.ln_f` (GPT-2), `model.norm`
    (Llama, Gemma, Mistral, Qwen) or `model.language_model.norm` (multimodal wrappers)."""
    paths = (
        "gpt_neox.final_layer_norm",
        "transformer.ln_f",
        "model.norm",
        "model.language_model.norm",
    )
    for path in paths:
        mod: Any = model
        for part in path.split("."):
            mod = getattr(mod, part, None)
            if mod is None:
                break
        if isinstance(mod, nn.Module):
            return mod
    raise ValueError(
        f"cannot find the final norm of {type(model).__name__}; "
        f"supported paths: {', '.join(paths)}"
    )


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's parameters (the one its inputs must be on)."""
    return next(model.parameters()).device


def validate_sites(model: ModelConfig, sites: Sequence[str], layers: Sequence[int],
                   field: str = "cache.layers") -> int:
    """Check layer indices (the config's `field`) against the model's depth before any work
    starts; returns d_model."""
    n_layers, d_model = model_dims(model)
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise ConfigError(
            f"{field}: layer {bad[0]} is outside {model.name!r}, which has {n_layers} "
            f"blocks (allowed: 0..{n_layers - 1})"
        )
    for site in sites:
        parse_hook_name(hook_name(site, 0))
    return d_model


# ---------------------------------------------------------------------------------------------
# Hooks


class _StopForward(Exception):
    """Raised from a hook once every requested site is captured: the rest of the model is skipped."""


def _block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _replace_input(args: tuple, kwargs: dict, x: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (x, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": x}


def _replace_output(out: Any, x: torch.Tensor) -> Any:
    return (x, *out[1:]) if isinstance(out, tuple) else x


@contextlib.contextmanager
def _hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def capture(model: nn.Module, sites: Sequence[tuple[str, int]], stop: bool = False
            ) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, every forward pass records the residual stream [B, T, D] at each
    (site, layer) into the yielded dict; with `stop`, the pass ends (`_StopForward`) once the
    deepest requested site is recorded."""
    blocks = get_blocks(model)
    wanted = {hook_name(s, i) for s, i in sites}
    cache: dict[str, torch.Tensor] = {}

    def record(name: str, x: torch.Tensor) -> None:
        cache[name] = x.detach()
        if stop and len(cache) == len(wanted):
            raise _StopForward

    handles = []
    for site, layer in sorted(set(sites), key=lambda s: s[1]):
        name = hook_name(site, layer)
        if site == "resid_pre":
            hook = lambda _m, a, k, n=name: record(n, _block_input(a, k))  # noqa: E731
            handles.append(blocks[layer].register_forward_pre_hook(hook, with_kwargs=True))
        else:
            hook = lambda _m, _a, o, n=name: record(n, _block_output(o))  # noqa: E731
            handles.append(blocks[layer].register_forward_hook(hook))
    with _hooks(handles):
        yield cache
    missing = wanted - set(cache)
    if missing:
        raise RuntimeError(f"sites {sorted(missing)} were never reached in the forward pass")


def run_with_cache(
    model: nn.Module,
    input_ids_BT: torch.Tensor,
    sites: Sequence[tuple[str, int]],
    attention_mask_BT: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Residual-stream activations [B, T, D] at every (site, layer), from one forward pass that
    stops right after the deepest requested site (caching layer 2 costs 3 blocks, not 12)."""
    with capture(model, sites, stop=True) as cache, torch.inference_mode(), \
            contextlib.suppress(_StopForward):
        model(input_ids=input_ids_BT, attention_mask=attention_mask_BT, use_cache=False)
    return cache


@contextlib.contextmanager
def splice(
    model: nn.Module, site: str, layer: int, fn: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[None]:
    """Within the block, the residual stream at (site, layer) is replaced by fn(x) for the rest
    of every forward pass: an SAE reconstruction, zeros, a stitched stream."""
    block = get_blocks(model)[layer]
    if site == "resid_pre":

        def pre(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            return _replace_input(args, kwargs, fn(_block_input(args, kwargs)))

        handle = block.register_forward_pre_hook(pre, with_kwargs=True)
    elif site == "resid_post":

        def post(_m: nn.Module, _args: tuple, out: Any) -> Any:
            return _replace_output(out, fn(_block_output(out)))

        handle = block.register_forward_hook(post)
    else:
        raise ConfigError(f"site {site!r} is not supported; expected resid_pre or resid_post")
    with _hooks([handle]):
        yield
