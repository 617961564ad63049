"""``--spec MODULE NAME``: a user-provided decoder layer spec, Megatron-LM / THUDM/slime style.

NAME in MODULE is either a megatron ``ModuleSpec`` (or ``TransformerBlockSubmodules``), or a
function ``fn(args, config, vp_stage)`` returning one, as slime calls it. Here ``args`` is the
model's `model_config.ModelArgs` (Megatron-LM field names: ``num_experts``, ``qk_layernorm``,
``post_self_attn_layernorm``, ...), ``config`` megatron's TransformerConfig, ``vp_stage`` the
model chunk being built (None without virtual pipeline stages).

Paths THUDM/slime's scripts name for modules it ships in ``slime_plugins`` resolve through
`SPEC_ALIASES` to ours (this project has no ``slime_plugins`` package: the top level is
fixed), so ``--spec slime_plugins.models.glm4 get_glm_spec`` in slime's ``glm4-9B.sh`` builds
our GLM4 layer. Any other path is imported as given.

Torch-free: `resolve_spec_path` only maps names; `load_spec` imports (the module may import
megatron) and is called at start-up (`check_spec`) and where the model is built.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SPEC_ALIASES", "check_spec", "load_spec", "resolve_spec_path"]

SPEC_ALIASES: dict[tuple[str, str], tuple[str, str]] = {
    ("slime_plugins.models.glm4", "get_glm_spec"): ("slime.backends.megatron_utils.glm4", "get_glm_spec"),
}


def resolve_spec_path(spec) -> tuple[str, str] | None:
    """``--spec``'s (module, name) after the alias table; None when not given."""
    from slime.backends.megatron_utils.moe_config import ModelConfigError

    if spec is None:
        return None
    spec = tuple(spec)
    if len(spec) != 2 or not all(isinstance(s, str) and s.strip() for s in spec):
        raise ModelConfigError(f"--spec takes MODULE NAME (two words), got {list(spec)!r}")
    return SPEC_ALIASES.get(spec, spec)


def load_spec(spec: tuple[str, str]) -> Any:
    """The object ``--spec`` names: a layer/block spec, or a callable returning one."""
    import importlib

    from slime.backends.megatron_utils.moe_config import ModelConfigError

    module_name, name = spec
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelConfigError(f"--spec {module_name} {name}: cannot import module {module_name!r}: {e}") from e
    obj = getattr(module, name, None)
    if obj is None:
        raise ModelConfigError(f"--spec {module_name} {name}: module {module_name!r} has no attribute {name!r}")
    if not callable(obj) and not hasattr(obj, "module") and not hasattr(obj, "layer_specs"):
        raise ModelConfigError(
            f"--spec {module_name} {name}: {name!r} is neither a ModuleSpec / TransformerBlockSubmodules "
            "nor a function (args, config, vp_stage) returning one"
        )
    return obj


def check_spec(spec) -> None:
    """Start-up check: ``--spec`` (aliases applied) imports and names a usable object."""
    resolved = resolve_spec_path(spec)
    if resolved is not None:
        load_spec(resolved)
