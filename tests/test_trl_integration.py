"""XTF inside TRL: `XTFSFTTrainer` and `XTFCallback` on real TRL with a tiny local model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import gsm8k_rows
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from xtf_plugin.integrations.trl import XTFCallback, XTFSFTConfig, XTFSFTTrainer

XTF = {"drop_ratio": 0.4, "mode": "weighted"}


def prompt_completion(n: int) -> Dataset:
    rows = gsm8k_rows(n)
    return Dataset.from_list([{"prompt": r["question"] + "\n", "completion": r["answer"]} for r in rows])


def sft_config(tmp_path, xtf=None, **overrides) -> SFTConfig:
    """TRL's `SFTConfig`, or with `xtf` settings an `XTFSFTConfig`."""
    settings = dict(
        output_dir=str(tmp_path / "run"),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        logging_steps=1,
        max_length=256,
        bf16=False,
        report_to="none",
        save_strategy="no",
        gradient_checkpointing=False,
        seed=0,
    )
    settings.update(overrides)
    return SFTConfig(**settings) if xtf is None else XTFSFTConfig(**settings, xtf=xtf)


class Recording:
    """Records what reaches compute_loss (labels and num_items_in_batch) on a trainer class."""

    def __init__(self):
        self.batches: list[tuple[torch.Tensor, float | None]] = []

    def wrap(self, base):
        record = self.batches

        class RecordingTrainer(base):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                record.append((inputs["labels"].detach().clone(), None if num_items_in_batch is None else float(num_items_in_batch)))
                return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

        return RecordingTrainer


def expected_rows(result) -> dict[tuple[int, ...], list[int]]:
    scored = result.scored
    ids = scored.per_example(scored.input_ids)
    return {tuple(x.tolist()): lab.tolist() for x, lab in zip(ids, result.labels, strict=True)}


def check_batches(batches, trainer, expected):
    for labels, num_items in batches:
        assert num_items == float((labels[..., 1:] != -100).sum())
    # unpadded rows: every row's labels are exactly XTF's masked labels for that example
    dataset = trainer.train_dataset
    for row in dataset:
        assert row["labels"] == expected[tuple(row["input_ids"])]


@pytest.mark.parametrize("packing", [False, True])
def test_xtf_sft_trainer_masks_labels(tiny_model_dir, tmp_path, cache_dir, packing):
    recording = Recording()
    trainer = recording.wrap(XTFSFTTrainer)(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
        args=sft_config(tmp_path, packing=packing, xtf=XTF),
        train_dataset=prompt_completion(8),
    )
    result = trainer.xtf_result
    assert result is not None and result.summary["dropped_tokens"] > 0
    expected = expected_rows(result)
    if not packing:
        check_batches([], trainer, expected)
    else:
        # packed rows are the masked examples laid end to end
        for row in trainer.train_dataset:
            start = 0
            for length in row["seq_lengths"]:
                piece = tuple(row["input_ids"][start : start + length])
                assert row["labels"][start : start + length] == expected[piece]
                start += length
    output = trainer.train()
    assert np.isfinite(output.training_loss)
    assert recording.batches
    for labels, num_items in recording.batches:
        assert num_items == float((labels[..., 1:] != -100).sum())
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all("xtf/kept_fraction" in entry for entry in logged)
    assert logged[0]["xtf/kept_fraction"] == pytest.approx(result.summary["kept_fraction"])
    assert "mean_token_accuracy" in logged[0]
    report = (tmp_path / "run" / "xtf_report.html").read_text()
    assert "<svg" in report and str(result.summary["dropped_tokens"]) in report.replace(",", "")


def test_callback_on_stock_trainer_masks_batches(tiny_model_dir, tmp_path, cache_dir):
    recording = Recording()
    callback = XTFCallback(XTF)
    trainer = recording.wrap(SFTTrainer)(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
        args=sft_config(tmp_path, per_device_train_batch_size=8, max_steps=2),
        train_dataset=prompt_completion(8),
        callbacks=[callback],
    )
    trainer.train()
    expected = expected_rows(callback.xtf_result)
    assert callback.xtf_result.summary["dropped_tokens"] > 0
    seen = changed = 0
    for labels, num_items in recording.batches:
        assert num_items == float((labels[..., 1:] != -100).sum())
    # rebuild each batch row's example from the recorded labels: the dropped positions are -100
    unmasked = Dataset.from_list(list(trainer.train_dataset))
    by_ids = {tuple(r["input_ids"]): r["labels"] for r in unmasked}
    for labels, _ in recording.batches:
        for row in labels.tolist():
            matches = [key for key, lab in expected.items() if lab == row[: len(lab)] and set(row[len(lab) :]) <= {-100}]
            assert matches, "a batch row does not carry XTF's masked labels"
            changed += by_ids[matches[0]] != expected[matches[0]]
            seen += 1
    assert seen == 16
    # every example with more than one response token lost some labels to XTF (one example is cut to a
    # single response token by max_length, and XTF never masks an example's last trainable token)
    assert changed == 14
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all("xtf/kept_fraction" in entry for entry in logged)
    assert "<svg" in (tmp_path / "run" / "xtf_report.html").read_text()


def test_gradient_accumulation_is_normalised_over_kept_tokens(tiny_model_dir, tmp_path, cache_dir):
    """One step of 1 x 4 examples and of 4 x 1 with accumulation end with the same weights."""
    weights = []
    for batch, accumulation in ((4, 1), (1, 4)):
        torch.manual_seed(0)
        trainer = XTFSFTTrainer(
            model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
            processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
            args=sft_config(
                tmp_path / f"{batch}x{accumulation}",
                per_device_train_batch_size=batch,
                gradient_accumulation_steps=accumulation,
                max_steps=1,
                optim="sgd",
                learning_rate=1.0,
                lr_scheduler_type="constant",
                xtf=XTF,
            ),
            train_dataset=prompt_completion(4),
        )
        trainer.train()
        weights.append(torch.cat([p.detach().flatten() for p in trainer.model.parameters()]))
    torch.testing.assert_close(weights[0], weights[1], atol=1e-5, rtol=0)


def test_xtf_sft_trainer_scores_a_4bit_qlora_model_with_its_base_weights(model64_dir, tmp_path, cache_dir):
    """QLoRA: the trainer's own 4-bit model scores (adapters disabled), then LoRA trains on the kept tokens."""
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    from xtf_plugin.integrations.common import mask_examples

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model64_dir, quantization_config=quantization, device_map={"": "cpu"})
    trainer = XTFSFTTrainer(
        model=model,
        processing_class=AutoTokenizer.from_pretrained(model64_dir),
        args=sft_config(tmp_path, max_steps=2, xtf=XTF),
        train_dataset=prompt_completion(6),
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    assert type(trainer.model.get_decoder().layers[0].mlp.up_proj.base_layer).__name__ == "Linear4bit"
    result = trainer.xtf_result
    # after changing the adapter, scoring still gives the base model's scores: the adapter is disabled
    with torch.no_grad():
        for module in trainer.model.modules():
            if hasattr(module, "lora_B"):
                for weight in module.lora_B.values():
                    weight.weight.add_(0.5)  # an adapter that would change every score if it were active
    fresh = trainer.xtf_config.model_copy(update={"cache_dir": str(tmp_path / "fresh-cache")})  # really rescore
    again = mask_examples(trainer.model, trainer.processing_class, result.scored.per_example(result.scored.input_ids),
                          result.scored.per_example(result.scored.labels), fresh, progress=False)
    assert again.summary["forward_passes"] > 0
    from xtf_plugin.scoring.engine import score_forward

    active = score_forward(trainer.model, result.scored.per_example(result.scored.input_ids),
                           result.scored.per_example(result.scored.labels), trainer.xtf_config, progress=False)

    def drift(scores):
        return max(np.nanmax(np.abs(scores.kn - result.scored.scores.kn)), np.nanmax(np.abs(scores.ri - result.scored.scores.ri)))

    # rescoring the same trainer's model drifts by ~5e-5 (bitsandbytes' CPU kernel), far below what the
    # active adapter does to the scores
    assert drift(again.scored.scores) < 0.05 * drift(active)
    output = trainer.train()
    assert np.isfinite(output.training_loss)


def test_soft_mode_weights_each_token_loss(tiny_model_dir, tmp_path, cache_dir):
    """weighted + soft: no label is dropped; the loss is sum(weight * nll) / trained tokens."""
    from xtf_plugin.errors import XTFError

    recording = Recording()
    trainer = recording.wrap(XTFSFTTrainer)(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
        args=sft_config(tmp_path, max_steps=1, per_device_train_batch_size=4, xtf={"mode": "weighted", "soft": True}),
        train_dataset=prompt_completion(4),
    )
    scored = trainer.xtf_result.scored
    row = trainer.train_dataset[0]
    assert row["labels"] == scored.per_example(scored.labels)[0].tolist()  # nothing dropped
    weights = np.array(row["xtf_weight"])
    response = np.array(row["labels"]) != -100
    assert (weights[~response] == 0).all() and (weights[response] > 0).all() and (weights <= 1).all()
    assert len(set(weights[response].round(6))) > 3  # real per-token weights, not a constant
    # the loss of one batch by hand: weighted nll over the trained-token count
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    model = trainer.model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
        labels = batch["labels"][:, 1:]
        mask = labels != -100
        nll = -logp.gather(2, labels.clamp(min=0)[..., None])[..., 0]
        expected = (nll * batch["xtf_weight"][:, 1:].double() * mask).sum() / mask.sum()
        loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=mask.sum())
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    model.train()
    trainer.train()
    assert recording.batches
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all(0 < entry["xtf/mean_weight"] < 1 and "xtf/kept_fraction" not in entry for entry in logged)

    with pytest.raises(XTFError, match="packing"):
        XTFSFTTrainer(
            model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
            processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
            args=sft_config(tmp_path / "packed", packing=True, xtf={"mode": "weighted", "soft": True}),
            train_dataset=prompt_completion(4),
        )


def test_xtf_sft_config_reads_every_form_of_the_xtf_field(tmp_path):
    """`xtf` as a mapping, a JSON string (as `--xtf '{...}'` gives it), a YAML file or an `XTFConfig` becomes an
    `XTFConfig`; a bad key fails at construction naming it; `to_dict` stays JSON (the trainer logs it)."""
    import json

    from trl import TrlParser

    from xtf_plugin.config import XTFConfig, XTFConfigError

    common = {"output_dir": str(tmp_path / "run"), "bf16": False, "report_to": "none"}
    yaml_file = tmp_path / "xtf.yaml"
    yaml_file.write_text("xtf:\n  drop_ratio: 0.3\n  protect: ['^#### .*']\n")
    for value in ({"drop_ratio": 0.3, "protect": ["^#### .*"]}, '{"drop_ratio": 0.3, "protect": ["^#### .*"]}',
                  str(yaml_file), XTFConfig(drop_ratio=0.3, protect=["^#### .*"])):
        config = XTFSFTConfig(**common, xtf=value).xtf
        assert isinstance(config, XTFConfig) and config.drop_ratio == 0.3 and config.protect == ["^#### .*"]
    assert XTFSFTConfig(**common).xtf == XTFConfig()
    with pytest.raises(XTFConfigError, match="xtf.bogus: unknown key"):
        XTFSFTConfig(**common, xtf={"bogus": 1})
    dumped = json.loads(json.dumps(XTFSFTConfig(**common, xtf={"drop_ratio": 0.3}).to_dict()))
    assert dumped["xtf"]["drop_ratio"] == 0.3
    (args,) = TrlParser((XTFSFTConfig,)).parse_args_and_config(
        ["--output_dir", str(tmp_path / "cli"), "--bf16", "false", "--xtf", '{"mode": "union", "drop_ratio": 0.2}'])
    assert (args.xtf.mode, args.xtf.drop_ratio) == ("union", 0.2)
