"""What MCTPTrainer needs of transformers: the private methods it overrides (named when a release
drops or changes one), the public points it uses, the sampler set through public arguments,
and the strict resume check done in the public ``train``."""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers
from test_trainer import _trainer
from transformers import Trainer, TrainingArguments

from mctp.training import PRIVATE_TRAINER_METHODS, check_transformers_api


@pytest.mark.parametrize("name", sorted(PRIVATE_TRAINER_METHODS))
def test_the_private_trainer_methods_we_override_still_exist(name):
    version = transformers.__version__
    method = getattr(Trainer, name, None)
    assert method is not None, f"transformers {version} removed Trainer.{name}"
    have = tuple(inspect.signature(method).parameters)
    assert have == PRIVATE_TRAINER_METHODS[name], (
        f"transformers {version} changed Trainer.{name}{have}"
    )


def test_the_public_points_we_use_keep_their_parameters():
    def params(fn):
        return tuple(inspect.signature(fn).parameters)

    assert params(Trainer.compute_loss)[:5] == (
        "self",
        "model",
        "inputs",
        "return_outputs",
        "num_items_in_batch",
    )
    assert params(Trainer.create_optimizer) == ("self", "model")
    assert params(Trainer.log) == ("self", "logs", "start_time")
    assert params(Trainer.save_model) == ("self", "output_dir", "_internal_call")
    assert params(Trainer.train)[1] == "resume_from_checkpoint"
    assert "train_sampling_strategy" in inspect.signature(TrainingArguments).parameters
    from transformers.trainer_utils import get_last_checkpoint, rotate_checkpoints

    assert "save_total_limit" in inspect.signature(rotate_checkpoints).parameters
    assert callable(get_last_checkpoint)


def test_a_removed_or_changed_private_method_is_named(monkeypatch):
    check_transformers_api()  # the installed release passes
    monkeypatch.delattr(Trainer, "_save_checkpoint")
    with pytest.raises(RuntimeError, match=r"has no Trainer\._save_checkpoint"):
        check_transformers_api()
    monkeypatch.undo()
    monkeypatch.setattr(Trainer, "_save", lambda self, output_dir: None)
    with pytest.raises(RuntimeError, match=r"changed Trainer\._save\('self', 'output_dir'\)"):
        check_transformers_api()


def test_the_dataset_order_is_kept_through_public_arguments(tmp_path):
    t = _trainer(tmp_path)
    assert t.args.train_sampling_strategy == "sequential"
    loader = t.get_train_dataloader()
    sampler = getattr(loader, "base_dataloader", loader).sampler
    assert isinstance(sampler, torch.utils.data.SequentialSampler)
    shuffled = _trainer(tmp_path / "s", shuffle=True)
    assert shuffled.args.train_sampling_strategy == "random"


def test_resuming_a_checkpoint_that_does_not_fit_raises(tmp_path):
    t = _trainer(tmp_path, steps=1)
    t.train()
    assert (tmp_path / "checkpoint-1" / "model.safetensors").is_file()
    more = _trainer(tmp_path, heads=3, steps=2)  # a third head the checkpoint lacks
    with pytest.raises(RuntimeError, match=r"does not match the model: missing \['stack\.heads\.2"):
        more.train(resume_from_checkpoint=True)


def test_a_release_that_divides_gradients_twice_is_refused(tmp_path, monkeypatch):
    """transformers < 5.5.4 gave accelerate the accumulation steps: gradients divided twice."""
    from accelerate import Accelerator

    monkeypatch.setattr(Accelerator, "gradient_accumulation_steps", property(lambda self: 2))
    with pytest.raises(
        RuntimeError, match=r"divides every gradient .* fixed in transformers 5\.5\.4"
    ):
        _trainer(tmp_path)
