"""Preference and reward methods before anything trains: the spec (each method's options under TRL's
names, refusals naming what does not apply), the graders, the data check before queuing, the
planner's terms, the /v1 mapping, and the metrics a step log keeps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import TypeAdapter, ValidationError

from core.graders import Grader, evaluate_formula, similarity
from core.planner import GIB, plan_memory, shape_from_config
from core.spec import JobSpec
from tests.builders import (
    LLAMA_3_1_8B,
    SMALL_LLAMA,
    chat_rows,
    openai_preference_rows,
    preference_rows,
    unpaired_rows,
    write_jsonl,
)
from tests.conftest import Env, clear_caches, job_spec

GRADERS: TypeAdapter[Any] = TypeAdapter(Grader)
EXACT = {
    "type": "string_check",
    "name": "exact",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "operation": "eq",
}


def spec_errors(**fields: Any) -> list[tuple[str, str]]:
    try:
        JobSpec.model_validate({"model": "org/model", "dataset": {"source": "org/data"}, **fields})
    except ValidationError as exc:
        return [(".".join(map(str, e["loc"])), e["msg"]) for e in exc.errors()]
    raise AssertionError("the spec validated")


# ---- the spec --------------------------------------------------------------------------------------


def test_a_method_gets_its_trl_defaults_and_sft_gets_none_of_them() -> None:
    dpo = JobSpec.model_validate({"model": "org/m", "dataset": {"source": "org/d"}, "method": "dpo"})
    hp = dpo.hyperparameters
    assert (hp.beta, hp.loss_type, hp.label_smoothing, hp.precompute_ref_log_probs) == (0.1, "sigmoid", 0.0, False)
    assert hp.num_generations is None and hp.desirable_weight is None
    grpo = JobSpec.model_validate({"model": "org/m", "dataset": {"source": "org/d"}, "method": "grpo", "grader": EXACT})
    hp = grpo.hyperparameters
    assert (hp.beta, hp.loss_type, hp.num_generations, hp.max_completion_length, hp.scale_rewards) == (
        0.0,
        "dapo",
        8,
        512,
        "group",
    )
    sft = JobSpec.model_validate({"model": "org/m", "dataset": {"source": "org/d"}})
    assert sft.method == "sft" and sft.hyperparameters.beta is None


def test_options_of_another_method_are_refused_by_name() -> None:
    assert spec_errors(hyperparameters={"beta": 0.2}) == [
        ("hyperparameters.beta", "beta applies to method dpo, orpo, kto and grpo, not to 'sft'")
    ]
    assert spec_errors(method="dpo", hyperparameters={"packing": True, "num_generations": 4}) == [
        ("hyperparameters.num_generations", "num_generations applies to method grpo, not to 'dpo'"),
        ("hyperparameters.packing", "packing applies to method sft, not to 'dpo'"),
    ]
    assert spec_errors(method="kto", hyperparameters={"padding_free": False}) == [
        ("hyperparameters.padding_free", "padding_free applies to method sft, not to 'kto'")
    ]
    assert spec_errors(hyperparameters={"packing": True, "padding_free": False}) == [
        (
            "hyperparameters.padding_free",
            "packing needs padding_free (TRL keeps the packed rows apart by their position ids, in one row without "
            "padding); leave padding_free null or true, or turn packing off",
        )
    ]
    assert spec_errors(method="orpo", hyperparameters={"precompute_ref_log_probs": True}) == [
        (
            "hyperparameters.precompute_ref_log_probs",
            "precompute_ref_log_probs applies to method dpo and kto, not to 'orpo'",
        )
    ]
    # An SFT option at its default does nothing: not refused.
    JobSpec.model_validate(
        {"model": "o/m", "dataset": {"source": "o/d"}, "method": "dpo", "hyperparameters": {"packing": False}}
    )


def test_what_trl_would_refuse_only_once_running_is_refused_at_submit() -> None:
    assert spec_errors(method="dpo", hyperparameters={"loss_type": "dapo"})[0][0] == "hyperparameters.loss_type"
    assert spec_errors(method="dpo", hyperparameters={"loss_type": "exo_pair"}) == [
        ("hyperparameters.label_smoothing", "loss_type exo_pair needs label_smoothing above 0 (e.g. 1e-3)")
    ]
    assert spec_errors(method="kto", hyperparameters={"per_device_train_batch_size": 1})[0][0] == (
        "hyperparameters.per_device_train_batch_size"
    )
    assert spec_errors(method="grpo")[0] == (
        "grader",
        'method grpo needs a grader to score its completions, e.g. {"type": "string_check", "name": "exact", '
        '"input": "{{sample.output_text}}", "reference": "{{item.answer}}", "operation": "eq"}',
    )
    assert spec_errors(method="dpo", grader=EXACT) == [
        ("grader", "a grader scores generations: it is for method 'grpo', not 'dpo'")
    ]
    assert spec_errors(
        method="grpo",
        grader=EXACT,
        hyperparameters={"per_device_train_batch_size": 3, "gradient_accumulation_steps": 1},
    ) == [
        (
            "hyperparameters.num_generations",
            "the completions generated at once (per_device_train_batch_size x gradient_accumulation_steps x gpus = 3) "
            "must be a multiple of num_generations (8), so that every prompt gets all its completions",
        )
    ]
    assert spec_errors(method="grpo", grader=EXACT, hyperparameters={"max_seq_length": 256})[0][0] == (
        "hyperparameters.max_completion_length"
    )


def test_the_stored_spec_of_an_sft_job_holds_no_method_options(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path
) -> None:
    record = client.post("/jobs", json=job_spec(tiny_model, chat_dataset)).json()
    assert "method" not in record["spec"] and "grader" not in record["spec"]
    assert not {"beta", "loss_type", "num_generations"} & set(record["spec"]["hyperparameters"])
    pairs = write_jsonl(env.datasets_dir / "pairs.jsonl", preference_rows(8))
    dpo = client.post("/jobs", json={**job_spec(tiny_model, pairs), "method": "dpo"}).json()
    assert dpo["spec"]["method"] == "dpo" and dpo["spec"]["hyperparameters"]["beta"] == 0.1
    assert "num_generations" not in dpo["spec"]["hyperparameters"]


# ---- graders ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("operation", "output", "expected"),
    [("eq", "cat", 1.0), ("eq", " cat", 0.0), ("ne", "dog", 1.0), ("like", "a cat!", 1.0), ("ilike", "A CAT", 1.0)],
)
def test_string_check_operations(operation: str, output: str, expected: float) -> None:
    grader = GRADERS.validate_python({**EXACT, "operation": operation})
    assert grader.score(output, {"answer": "cat"}) == expected


def test_text_similarity_metrics_are_one_for_the_same_text_and_below_for_another() -> None:
    for metric in ("fuzzy_match", "bleu", "gleu", "rouge_1", "rouge_2", "rouge_l"):
        assert similarity(metric, "the cat sat on the mat", "the cat sat on the mat") == 1.0
        assert 0 < similarity(metric, "the cat sat on a mat", "the cat sat on the mat") < 1
        assert similarity(metric, "blue", "the cat sat on the mat") < 0.3
    assert similarity("rouge_1", "the cat", "cat the") == 1.0 and similarity("rouge_2", "the cat", "cat the") == 0.0


def test_regex_and_json_schema_checks() -> None:
    number = GRADERS.validate_python({"type": "regex", "name": "n", "pattern": r"\d+", "match": "fullmatch"})
    assert (number.score("123", {}), number.score("12a", {})) == (1.0, 0.0)
    loose = GRADERS.validate_python({"type": "regex", "name": "n", "pattern": "answer", "ignore_case": True})
    assert loose.score("The ANSWER is 4", {}) == 1.0
    schema = {"type": "object", "required": ["a"], "properties": {"a": {"type": "integer", "minimum": 1}}}
    shaped = GRADERS.validate_python({"type": "json_schema", "name": "j", "schema": schema})
    assert [shaped.score(text, {}) for text in ('{"a": 2}', '{"a": 0}', '{"b": 2}', "not json")] == [1, 0, 0, 0]
    assert shaped.model_dump()["schema"] == schema  # as OpenAI-style specs name it


def test_multi_combines_its_graders_by_a_formula_and_evaluates_nothing_else() -> None:
    multi = GRADERS.validate_python(
        {
            "type": "multi",
            "name": "answer",
            "graders": {
                "exact": EXACT,
                "close": {
                    "type": "text_similarity",
                    "name": "close",
                    "reference": "{{item.answer}}",
                    "evaluation_metric": "fuzzy_match",
                },
            },
            "calculate_output": "0.7 * exact + 0.3 * close",
        }
    )
    assert multi.score("cat", {"answer": "cat"}) == pytest.approx(1.0)
    assert multi.score("cap", {"answer": "cat"}) == pytest.approx(0.3 * 2 / 3)
    assert evaluate_formula("max(a, b) ^ 2 - abs(-1)", {"a": 0.5, "b": 2}) == 3.0
    assert evaluate_formula("a / b", {"a": 1, "b": 0}) == 0.0


@pytest.mark.parametrize(
    ("grader", "says"),
    [
        ({"type": "python", "name": "p", "source": "def grade(s, i): return 1"}, "runs the code in the spec"),
        ({"type": "score_model", "name": "s", "model": "gpt-4o"}, "needs a model to grade with"),
        ({"type": "nope", "name": "x"}, "is not one this server knows"),
        ({**EXACT, "reference": "{{item}}"}, "{{item}} is not a template this server fills"),
        ({**EXACT, "reference": "{{sample.output_json}}"}, "is not a template this server fills"),
        (
            {"type": "text_similarity", "name": "t", "reference": "x", "evaluation_metric": "cosine"},
            "it needs an embedding model",
        ),
        ({"type": "regex", "name": "r", "pattern": "("}, "pattern does not compile"),
        ({"type": "json_schema", "name": "j", "schema": {"$ref": "#/defs/a"}}, "uses $ref"),
        (
            {"type": "multi", "name": "m", "graders": {"a": EXACT}, "calculate_output": "a + b"},
            "calculate_output names b",
        ),
        (
            {"type": "multi", "name": "m", "graders": {"a": EXACT}, "calculate_output": "__import__('os').getpid()"},
            "calculate_output may use numbers",
        ),
    ],
)
def test_graders_that_would_run_code_or_cannot_be_filled_are_refused(grader: dict[str, Any], says: str) -> None:
    with pytest.raises(ValidationError, match=says.replace("(", r"\(").replace("$", r"\$").replace("{", r"\{")):
        GRADERS.validate_python(grader)


def test_a_reward_module_is_refused_unless_the_operator_allows_it(
    client: httpx.Client, env: Env, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts = write_jsonl(env.datasets_dir / "prompts.jsonl", [{"prompt": "the cat", "answer": "x"}] * 4)
    spec = {
        **job_spec(tiny_model, prompts, per_device_train_batch_size=8, gradient_accumulation_steps=1),
        "method": "grpo",
        "grader": {"type": "reward_module", "name": "mine", "module": "json", "function": "dumps"},
    }
    spec["hyperparameters"]["max_completion_length"] = 8  # type: ignore[index]
    response = client.post("/jobs", json=spec)
    assert response.status_code == 422, response.text
    assert response.json()["errors"] == [
        {
            "field": "grader",
            "message": "reward module 'json' is not one this server's operator allows (REWARD_MODULES: none); the "
            "server runs no Python of a job's own: use string_check, text_similarity, regex, json_schema or multi",
        }
    ]
    monkeypatch.setenv("REWARD_MODULES", "json")
    clear_caches()
    assert client.post("/jobs", json=spec).status_code == 201


# ---- the data check before queuing ----------------------------------------------------------------


def submit(client: httpx.Client, model: Path, dataset: Path, method: str, **extra: Any) -> httpx.Response:
    hyperparameters = extra.pop("hyperparameters", {})
    return client.post("/jobs", json={**job_spec(model, dataset, **hyperparameters), "method": method, **extra})


def test_pairs_are_counted_and_identical_ones_named_before_queuing(
    client: httpx.Client, env: Env, tiny_model: Path
) -> None:
    rows = preference_rows(150)
    rows[7] = {**rows[7], "rejected": rows[7]["chosen"]}
    rows[9] = {"prompt": "hi", "chosen": "yes"}  # no rejected
    dataset = write_jsonl(env.datasets_dir / "pairs.jsonl", rows)
    response = submit(client, tiny_model, dataset, "dpo")
    assert response.status_code == 422  # 2 bad rows of 150 is more than MAX_BAD_ROW_FRACTION
    assert "line 8: 'chosen' and 'rejected' are the same, so the pair teaches nothing" in response.json()["detail"]
    assert "line 10: missing ['rejected']" in response.json()["detail"]
    del rows[9]
    write_jsonl(dataset, rows)
    report = submit(client, tiny_model, dataset, "dpo").json()["data_report"]
    assert (report["rows"], report["pairs"], report["identical_pairs"], report["bad_rows"]) == (149, 148, 1, 1)
    job_id = client.get("/jobs").json()["items"][0]["id"]
    queued = client.get(f"/jobs/{job_id}/events").json()["items"][0]["message"]
    assert (
        "dataset checked: 148 pairs of 149 rows in 'preference' format, 1 malformed row(s) will be skipped (1 of them "
        in queued
    )


@pytest.mark.parametrize("method", ["dpo", "orpo", "kto"])
def test_every_preference_format_is_read_for_every_preference_method(
    client: httpx.Client, env: Env, tiny_model: Path, method: str
) -> None:
    for name, rows, row_format in (
        ("openai", openai_preference_rows(4), "openai_preference"),
        ("plain", preference_rows(4, chat=False), "preference"),
        (
            "implicit",
            [
                {"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
                for r in preference_rows(4)
            ],
            "implicit_preference",
        ),
    ):
        dataset = write_jsonl(env.datasets_dir / f"{name}.jsonl", rows)
        response = submit(client, tiny_model, dataset, method)
        assert response.status_code == 201, response.text
        assert response.json()["data_report"]["row_format"] == row_format
        assert response.json()["data_report"]["pairs"] == 4


def test_kto_counts_its_labels_and_refuses_one_that_is_not_a_boolean(
    client: httpx.Client, env: Env, tiny_model: Path
) -> None:
    rows = unpaired_rows(10)
    dataset = write_jsonl(env.datasets_dir / "unpaired.jsonl", rows)
    report = submit(client, tiny_model, dataset, "kto").json()["data_report"]
    assert (report["row_format"], report["desirable_rows"], report["undesirable_rows"]) == ("unpaired_preference", 5, 5)
    rows[3]["label"] = "yes"
    write_jsonl(dataset, rows)
    detail = submit(client, tiny_model, dataset, "kto").json()["detail"]
    assert "line 4: 'label' must be true (a desirable completion) or false, not 'yes'" in detail


def test_grpo_rows_need_a_prompt_to_continue_and_what_the_grader_reads(
    client: httpx.Client, env: Env, tiny_model: Path
) -> None:
    rows: list[dict[str, Any]] = [{"prompt": f"question {i}", "answer": str(i)} for i in range(8)]
    rows.append({"prompt": "no answer here"})
    rows.append({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    dataset = write_jsonl(env.datasets_dir / "prompts.jsonl", rows)
    grpo = {
        "hyperparameters": {
            "per_device_train_batch_size": 8,
            "gradient_accumulation_steps": 1,
            "max_completion_length": 8,
        },
        "grader": EXACT,
    }
    detail = submit(client, tiny_model, dataset, "grpo", **grpo).json()["detail"]
    assert "line 9: missing 'answer', which the grader reads as {{item.answer}}" in detail
    chats = write_jsonl(
        env.datasets_dir / "chats.jsonl",
        [{"messages": [{"role": "user", "content": f"q {i}"}], "answer": str(i)} for i in range(3)]
        + [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "answer": "a"}],
    )
    detail = submit(client, tiny_model, chats, "grpo", **grpo).json()["detail"]
    assert "line 4: 'messages' ends with an assistant turn; the model generates that turn" in detail


def test_a_preference_method_on_chat_rows_says_what_its_rows_need(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path
) -> None:
    response = submit(client, tiny_model, chat_dataset, "dpo")
    assert response.json() == {
        "error": "InvalidDataset",
        "detail": "the dataset: the rows have columns ['messages']; a preference row needs 'prompt', 'chosen' and "
        "'rejected' ('chosen' and 'rejected' alone when they are conversations), or OpenAI's 'input', "
        "'preferred_output' and 'non_preferred_output' (dataset.columns maps other names onto these, e.g. "
        '{"chosen": "better", "rejected": "worse"})',
    }


def test_an_upload_is_recognised_in_any_method_s_format(client: httpx.Client, env: Env, tmp_path: Path) -> None:
    for name, rows, row_format in (
        ("chat", chat_rows(2), "messages"),
        ("openai", openai_preference_rows(2), "openai_preference"),
        ("pairs", preference_rows(2), "preference"),
        ("unpaired", unpaired_rows(2), "unpaired_preference"),
        ("prompts", [{"prompt": "q", "answer": "a"}], "prompt_only"),
    ):
        path = write_jsonl(tmp_path / f"{name}.jsonl", rows)
        with path.open("rb") as handle:
            uploaded = client.post("/files", files={"file": (path.name, handle)}).json()
        assert uploaded["row_format"] == row_format, uploaded


# ---- the planner -----------------------------------------------------------------------------------


def test_dpo_plans_its_reference_model_unless_precomputed_and_both_answers() -> None:
    shape = shape_from_config(dict(LLAMA_3_1_8B))
    hp = JobSpec.model_validate(
        {"model": "o/m", "dataset": {"source": "o/d"}, "method": "dpo", "hyperparameters": {"max_seq_length": 2048}}
    ).hyperparameters
    sft = plan_memory(shape, hp, 80 * GIB)
    dpo = plan_memory(shape, hp, 80 * GIB, method="dpo")
    assert dpo.parts["reference_model"] == 2 * shape.parameters
    assert dpo.parts["activations"] == 2 * sft.parts["activations"]  # chosen and rejected in one pass
    assert dpo.parts["logits"] == (4 * 2 * 2 * 2048 + 4 * 2048) * shape.vocab_size
    assert (
        dpo.total_bytes - sft.total_bytes
        == dpo.parts["reference_model"] + dpo.parts["logits"] + sft.parts["activations"]
    )
    precomputed = plan_memory(shape, hp.model_copy(update={"precompute_ref_log_probs": True}), 80 * GIB, method="dpo")
    assert "reference_model" not in precomputed.parts
    assert precomputed.total_bytes == dpo.total_bytes - dpo.parts["reference_model"]
    orpo = plan_memory(shape, hp, 80 * GIB, method="orpo")
    assert "reference_model" not in orpo.parts


def test_grpo_plans_the_generations_instead_of_training_s_activations_when_larger() -> None:
    shape = shape_from_config(dict(SMALL_LLAMA))
    spec = JobSpec.model_validate(
        {
            "model": "o/m",
            "dataset": {"source": "o/d"},
            "method": "grpo",
            "grader": EXACT,
            "hyperparameters": {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 16},
        }
    )
    plan = plan_memory(shape, spec.hyperparameters, 80 * GIB, method="grpo")
    per_token = 2 * 2 * SMALL_LLAMA["num_hidden_layers"] * SMALL_LLAMA["num_key_value_heads"] * (1024 // 16)
    assert plan.parts["generation"] == per_token * 4096 * 8 * 16
    varying = plan.parts["activations"] + plan.parts["logits"]
    assert plan.total_bytes == sum(plan.parts.values()) - min(varying, plan.parts["generation"])
    assert "reference_model" not in plan.parts  # beta 0: no reference model
    with_kl = plan_memory(shape, spec.hyperparameters.model_copy(update={"beta": 0.04}), 80 * GIB, method="grpo")
    assert with_kl.parts["reference_model"] == 2 * shape.parameters


def test_a_method_that_cannot_fit_is_refused_with_what_to_change(
    client: httpx.Client, env: Env, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.test_planner import config_only_model

    monkeypatch.setenv("GPU_MEMORY_BYTES", str(64 * GIB))
    clear_caches()
    eight_b = config_only_model(tiny_model.parent / "llama-8b-config", LLAMA_3_1_8B)
    pairs = write_jsonl(env.datasets_dir / "pairs.jsonl", preference_rows(8))
    dpo = submit(
        client, eight_b, pairs, "dpo", hyperparameters={"max_seq_length": 4096, "per_device_train_batch_size": 2}
    )
    assert dpo.status_code == 422 and dpo.json()["error"] == "DoesNotFit", dpo.text
    assert "reference_model 15.0 GiB" in dpo.json()["detail"]
    assert "set precompute_ref_log_probs: true" in dpo.json()["detail"]
    precomputed = client.post(
        "/jobs/estimate",
        json={
            **job_spec(
                eight_b, pairs, max_seq_length=4096, per_device_train_batch_size=2, precompute_ref_log_probs=True
            ),
            "method": "dpo",
        },
    ).json()["memory"]
    # Without the reference model it fits, its 8-bit optimizer states paged to host memory in part.
    assert precomputed["verdict"] == "fits_with_paging" and "reference_model" not in precomputed["parts"]
    prompts = write_jsonl(env.datasets_dir / "prompts.jsonl", [{"prompt": "q", "answer": "a"}] * 8)
    grpo = submit(
        client,
        eight_b,
        prompts,
        "grpo",
        grader=EXACT,
        hyperparameters={"per_device_train_batch_size": 8, "gradient_accumulation_steps": 64, "max_seq_length": 4096},
    )
    assert grpo.status_code == 422
    assert "most of it is the KV cache of the 512 completions generated at once" in grpo.json()["detail"]
    estimate = client.post(
        "/jobs/estimate",
        json={
            **job_spec(eight_b, prompts, max_seq_length=4096, per_device_train_batch_size=8),
            "method": "grpo",
            "grader": EXACT,
            "gpu_memory_bytes": 64 * GIB,
        },
    ).json()
    assert "generation" in estimate["memory"]["parts"]


# ---- /v1 -------------------------------------------------------------------------------------------


def test_openai_methods_map_onto_the_native_spec_and_back() -> None:
    from app.openai_compat import CreateFineTuningJob, method_object
    from app.openai_compat import job_spec as native_spec

    dpo = native_spec(
        CreateFineTuningJob.model_validate(
            {
                "model": "org/model",
                "training_file": "file-1",
                "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.3, "batch_size": 16}}},
            }
        )
    )
    assert (dpo.method, dpo.hyperparameters.beta, dpo.hyperparameters.gradient_accumulation_steps) == ("dpo", 0.3, 8)
    shown = method_object(dpo.model_dump(mode="json"))
    assert shown.type == "dpo" and shown.dpo is not None and shown.dpo.hyperparameters.beta == 0.3
    rft = native_spec(
        CreateFineTuningJob.model_validate(
            {
                "model": "org/model",
                "training_file": "file-1",
                "method": {
                    "type": "reinforcement",
                    "reinforcement": {
                        "grader": EXACT,
                        "hyperparameters": {"batch_size": 4, "compute_multiplier": "auto"},
                    },
                },
            }
        )
    )
    hp = rft.hyperparameters
    assert (rft.method, hp.per_device_train_batch_size * hp.gradient_accumulation_steps) == ("grpo", 32)
    assert rft.grader is not None and rft.grader.model_dump() == EXACT
    back = method_object(rft.model_dump(mode="json"))
    assert back.type == "reinforcement" and back.reinforcement is not None
    assert back.reinforcement.hyperparameters.batch_size == 4 and back.reinforcement.grader == EXACT


def test_step_log_keeps_the_method_s_figures_under_trl_s_names() -> None:
    from trainer.callbacks import method_metrics

    logs = {
        "loss": 0.6,
        "learning_rate": 1e-5,
        "grad_norm": 1.0,
        "epoch": 0.5,
        "num_tokens": 1234.0,
        "rewards/margins": 0.4,
        "rewards/accuracies": 1.0,
        "kl": float("nan"),
        "completions/mean_length": 12.0,
    }
    assert method_metrics(logs) == {
        "rewards/margins": 0.4,
        "rewards/accuracies": 1.0,
        "kl": None,
        "completions/mean_length": 12.0,
    }
    evaluation = {"eval_loss": 0.5, "eval_runtime": 1.0, "eval_rewards/margins": 0.3, "epoch": 1.0}
    assert method_metrics(evaluation, evaluation=True) == {"eval_rewards/margins": 0.3}


def test_kto_out_of_memory_stops_halving_at_a_micro_batch_of_two(env: Env) -> None:
    from core.contract import TrainerOutcome, TrainerResult
    from core.db import session_scope
    from core.models import Job, JobStatus
    from worker.stops import retry_with_smaller_batch

    spec = {"model": "o/m", "method": "kto", "dataset": {"source": "o/d"}}
    oom = TrainerResult(status=TrainerOutcome.failed, error_message="CUDA out of memory")
    with session_scope() as session:
        for micro, expected in ((4, "queued"), (2, "running")):
            job = Job(
                spec={**spec, "hyperparameters": {"per_device_train_batch_size": micro, "loss_type": "kto"}},
                status=JobStatus.running,
            )
            session.add(job)
            session.commit()
            assert job.id is not None
            retry_with_smaller_batch(session=session, job_id=job.id, result=oom)
            session.refresh(job)
            assert job.status == expected, (micro, job.status)
    assert json.dumps(spec)  # the spec itself is untouched


def test_the_cli_follows_a_method_s_headline_figures() -> None:
    from client.cli import _status_line

    record = {
        "status": "running",
        "metrics": {"loss": 0.5, "method_metrics": {"rewards/margins": 0.4123, "entropy": 6.0}},
        "vram": {},
        "progress": {"eta_seconds": None},
    }
    line = _status_line(record)
    assert "loss 0.5000 | rewards/margins 0.412 | eval -" in line and "entropy" not in line
