"""MCTP heads on disk and on the Hugging Face Hub: :class:`StackFiles`, a mixin of
:class:`~mctp.stack.MCTPStack`.

A stack is stored as its heads only (the backbone's shared embedding, final norm, lm_head and
rotary tables are not part of it): ``mctp_config.json`` (widths, vocabulary, number of heads,
output vocabulary) and ``model.safetensors``. Reading builds the heads the way
:meth:`MCTPStack.from_backbone <mctp.stack.MCTPStack.from_backbone>` does and loads the tensors
strictly (:func:`mctp.checkpoint.load_strict`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Self

from torch import nn

from .backbone import BackboneParts

__all__ = ["StackFiles"]


class StackFiles:
    """Saving, loading and uploading an :class:`~mctp.stack.MCTPStack`'s heads.

    Mixed into :class:`~mctp.stack.MCTPStack`, whose attributes it reads (``heads``,
    ``num_heads``, ``hidden_size``, ``vocab_size``, ``output_vocab``, ``state_dict``) and whose
    ``from_backbone`` builds the heads a folder is loaded into.
    """

    CONFIG_NAME = "mctp_config.json"
    WEIGHTS_NAME = "model.safetensors"

    def save_pretrained(self, folder: str | os.PathLike[str]) -> Path:
        """Write the heads (only: the shared backbone modules are not part of the stack) to
        ``folder``: ``mctp_config.json`` and ``model.safetensors``.

        Returns:
            The folder as a :class:`~pathlib.Path`.
        """
        from safetensors.torch import save_file

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        vocab = None if self.output_vocab is None else self.output_vocab.index.tolist()
        config = {
            "format": "mctp-stack",
            "version": 1,
            "num_heads": self.num_heads,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "rms_eps": float(self.heads[0].embed_norm.eps),
            "block_class": f"{type(self.heads[0].block).__module__}."
            f"{type(self.heads[0].block).__qualname__}",
            "output_vocab": vocab,
        }
        (out / self.CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(out / self.WEIGHTS_NAME), metadata={"format": "pt"})
        return out

    @classmethod
    def from_pretrained(
        cls,
        folder_or_repo: str | os.PathLike[str],
        parts: BackboneParts,
        *,
        block_factory: Callable[[int], nn.Module] | None = None,
        revision: str | None = None,
        token: str | None = None,
    ) -> Self:
        """Load heads written by :meth:`save_pretrained` onto a backbone's shared ``parts``.

        Heads are built as :meth:`from_backbone` builds them (copies of ``parts.last_block``,
        or ``block_factory``) and take the stored tensors strictly (a missing, unexpected or
        mis-shaped key raises), on the device and in the dtype of the built blocks.

        Args:
            folder_or_repo: A local folder, or a Hugging Face Hub repo id (downloaded with
                ``huggingface_hub``).
            parts: The backbone's shared parts (``HFBackbone(...).parts()``).
            block_factory: Builds head ``i``'s block (default: copies of the last block).
            revision: Hub revision (branch, tag or commit).
            token: Hub token for private repos.

        Returns:
            The stack (eval mode).

        Raises:
            FileNotFoundError: If the folder has no ``mctp_config.json``, or ``folder_or_repo`` is
                neither a local folder nor a repo the Hub gives (the message names the path).
            NotADirectoryError: If ``folder_or_repo`` is a file.
            ValueError: If ``mctp_config.json`` is not JSON or not a stack config, or the
                stored heads do not fit ``parts`` (width, vocabulary).
            mctp.CheckpointError: On missing, unexpected or mis-shaped tensors.
        """
        from .checkpoint import load_strict, read_state_dict

        folder = Path(folder_or_repo)
        if folder.is_file():
            raise NotADirectoryError(
                f"{folder} is a file; from_pretrained takes the folder save_pretrained wrote "
                "(or a Hub repo id)"
            )
        if not folder.is_dir():  # a Hub repo id, or a local folder that is not there
            from huggingface_hub import snapshot_download
            from huggingface_hub.utils import HFValidationError, validate_repo_id

            name, where = str(folder_or_repo), folder.expanduser().resolve()
            try:
                validate_repo_id(name)
            except HFValidationError:
                raise FileNotFoundError(
                    f"no folder {where} (and {name!r} is not a Hugging Face Hub repo id)"
                ) from None
            try:
                folder = Path(
                    snapshot_download(
                        name,
                        revision=revision,
                        token=token,
                        allow_patterns=[cls.CONFIG_NAME, cls.WEIGHTS_NAME],
                    )
                )
            except Exception as e:  # not found, offline, no access: name both places tried
                reason = " ".join(str(e).split())[:300]
                raise FileNotFoundError(
                    f"no folder {where}, and the Hub could not give repo {name!r}: "
                    f"{type(e).__name__}: {reason}"
                ) from e
        config_file = folder / cls.CONFIG_NAME
        if not config_file.is_file():
            raise FileNotFoundError(f"no {cls.CONFIG_NAME} in {folder}")
        try:
            config = json.loads(config_file.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{config_file} is not valid JSON: {e}") from e
        if not isinstance(config, dict) or config.get("format") != "mctp-stack":
            raise ValueError(f"{config_file} is not an MCTP stack config")
        needed = ("hidden_size", "vocab_size", "rms_eps", "num_heads", "output_vocab")
        if missing := [k for k in needed if k not in config]:
            raise ValueError(f"{config_file} lacks {missing}")
        if config["hidden_size"] != parts.hidden_size:
            raise ValueError(
                f"stored heads are {config['hidden_size']} wide, the backbone is {parts.hidden_size}"
            )
        vocab = getattr(parts.lm_head, "weight", None)
        if vocab is not None and config["vocab_size"] != vocab.shape[0]:
            raise ValueError(
                f"stored heads score {config['vocab_size']} tokens, the backbone's lm_head "
                f"{vocab.shape[0]}"
            )
        stack = cls.from_backbone(
            replace(parts, rms_eps=config["rms_eps"]),
            config["num_heads"],
            block_factory=block_factory,
            output_vocab=config["output_vocab"],
        )
        load_strict(stack, read_state_dict(folder / cls.WEIGHTS_NAME), what=str(folder))
        return stack.eval()

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        commit_message: str = "Upload MCTP heads",
    ) -> str:
        """Save (:meth:`save_pretrained`) and upload the heads to a Hugging Face Hub repo
        (created when missing) with ``huggingface_hub``.

        Returns:
            The URL of the commit.

        Raises:
            huggingface_hub errors: Offline mode, authentication or network failures.
        """
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=tmp,
                revision=revision,
                commit_message=commit_message,
            )
        return str(getattr(info, "commit_url", info))
