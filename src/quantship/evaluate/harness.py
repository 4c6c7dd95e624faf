"""lm-evaluation-harness (`lm-eval`) on quantship models, with task YAMLs and data shipped in the package.

    from quantship.evaluate.harness import run_harness
    r = run_harness("out/w8", ["quantship_mc", "quantship_gen"], limit=20)
    r["tasks"]["quantship_mc"]  == {"acc": 0.55, "acc_stderr": 0.11, "acc_norm": 0.5, ..., "n": 20}
    r["tasks"]["quantship_gen"] == {"exact_match": 0.35, "exact_match_stderr": 0.11, "n": 20}

The model goes to lm-eval's own Hugging Face wrapper, `lm_eval.models.huggingface.HFLM(pretrained=
<nn.Module>, tokenizer=...)`: a quantship artifact is loaded with `quantship.load` (verified; its
Linear layers are QuantLinear), a model name or HF folder as the float model. lm-eval then does its
own prompting, batching, loglikelihood scoring and greedy generation; quantship only supplies the
model and the task configs.

Tasks: a packaged task name (`local_task_names()`: `quantship_mc`, loglikelihood multiple choice;
`quantship_gen`, generate_until), or a path to your own task YAML. `dataset_path: json` tasks read
their `data_files` from local JSON/JSONL files; a relative data file is resolved against the YAML's
folder. Nothing is downloaded: HF_DATASETS_OFFLINE / HF_HUB_OFFLINE are set before `datasets` and
`lm_eval` are imported. lm-eval's built-in task names are refused (their data come from the hub).

lm-eval is an optional dependency: `pip install "quantship[harness]"`.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path
from typing import Any, Sequence

TASK_DIR_NAME = "harness_tasks"
DEFAULT_TASKS = ("quantship_mc", "quantship_gen")
DEFAULT_BATCH_SIZE = 8
INSTALL_HINT = 'lm-eval is not installed; pip install "quantship[harness]" (or pip install lm-eval==0.4.13)'
_OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
_SKIP_KEYS = ("alias", " ", "samples")  # non-metric entries lm-eval puts next to the metrics


def harness_available() -> bool:
    """True when lm-eval can be imported (it is an optional extra)."""
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


def task_dir() -> Path:
    """The folder of the packaged task YAMLs and their data files."""
    return Path(str(importlib.resources.files("quantship.evaluate") / TASK_DIR_NAME))


def local_task_names() -> list[str]:
    return sorted(p.stem for p in task_dir().glob("*.yaml"))


def _task_yaml(task: str) -> Path:
    if task in local_task_names():
        return task_dir() / f"{task}.yaml"
    path = Path(task).expanduser()
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"task file {str(path)!r} does not exist")
        return path
    raise ValueError(f"unknown harness task {task!r}; packaged tasks: {', '.join(local_task_names())}; or give "
                     f"the path of a task YAML with local data (lm-eval's built-in tasks need the hub, which "
                     f"is not reachable here)")


def load_task_config(task: str) -> dict:
    """A task config dict for lm-eval: the YAML with relative `data_files` made absolute.

    Only plain YAML is read (`yaml.safe_load`): `!function` tags and `include:` are not supported
    in local tasks, so a task file cannot make quantship import code.
    """
    import yaml

    path = _task_yaml(task)
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML, or it uses tags (!function) that local tasks do not "
                         f"support: {e}") from e
    if not isinstance(config, dict) or "task" not in config:
        raise ValueError(f"{path}: a task YAML must be a mapping with a 'task' name")
    if "include" in config:
        raise ValueError(f"{path}: 'include:' is not supported in local tasks; write the whole config in one file")
    kwargs = dict(config.get("dataset_kwargs") or {})
    files = kwargs.get("data_files")
    if files is not None:
        kwargs["data_files"] = _resolve_data_files(files, path.parent)
        config["dataset_kwargs"] = kwargs
    return config


def _resolve_data_files(files: Any, base: Path) -> Any:
    """data_files (a path, a list, or {split: path(s)}) with relative local paths made absolute."""
    if isinstance(files, dict):
        return {split: _resolve_data_files(v, base) for split, v in files.items()}
    if isinstance(files, (list, tuple)):
        return [_resolve_data_files(v, base) for v in files]
    text = str(files)
    if "://" in text:
        raise ValueError(f"data file {text!r} is remote; local tasks read local JSON/JSONL files only")
    path = Path(text).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} (from a task in {base}) does not exist")
    return str(path)


def _load(model_or_artifact, tokenizer):
    """(model, tokenizer, name) from a path/name, a (model, tokenizer) pair, or a model + tokenizer."""
    if isinstance(model_or_artifact, (str, Path)):
        from ..api import load
        from ..models.load import resolve_model

        model, tok = load(resolve_model(model_or_artifact))
        return model, tok, str(model_or_artifact)
    if isinstance(model_or_artifact, tuple):
        model, tok = model_or_artifact
        return model, tok, type(model).__name__
    if tokenizer is None:
        raise ValueError("a model object needs its tokenizer: run_harness(model, tasks, tokenizer=tok)")
    return model_or_artifact, tokenizer, type(model_or_artifact).__name__


def _metrics(task_result: dict) -> dict[str, float]:
    """lm-eval's {"acc,none": x, "acc_stderr,none": s, "alias": ...} -> {"acc": x, "acc_stderr": s}.

    The ",<filter>" suffix is dropped when the task has one filter (the usual case); with several
    filters the keys stay "metric,filter".
    """
    numeric = {k: float(v) for k, v in task_result.items()
               if k not in _SKIP_KEYS and "," in k and isinstance(v, (int, float)) and not isinstance(v, bool)}
    filters = {k.partition(",")[2] for k in numeric}
    if len(filters) > 1:
        return numeric
    return {k.partition(",")[0]: v for k, v in numeric.items()}


def run_harness(model_or_artifact, tasks: Sequence[str] = DEFAULT_TASKS, *, limit: int | None = None,
                tokenizer=None, batch_size: int = DEFAULT_BATCH_SIZE, num_fewshot: int | None = None,
                apply_chat_template: bool = False, seed: int = 0, log_samples: bool = False) -> dict:
    """Run lm-eval tasks on one model through lm-eval's HFLM wrapper; metrics per task.

    model_or_artifact: a quantship artifact folder, a built-in model name, a HF folder, a
    (model, tokenizer) pair, or a model with `tokenizer=`. Returns
    {"model", "lm_eval_version", "limit", "tasks": {task: {metric: value, "<metric>_stderr": s, "n": n}},
    "configs": {task: the config lm-eval ran}} (+ "samples" with log_samples).
    """
    if not harness_available():
        raise RuntimeError(INSTALL_HINT)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (documents per task) or None, got {limit}")
    if not tasks:
        raise ValueError(f"no tasks given; packaged tasks: {', '.join(local_task_names())}")
    configs = [load_task_config(t) for t in tasks]  # fail on a bad task before loading any model
    for key, value in _OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tok, name = _load(model_or_artifact, tokenizer)
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, max_length=_max_length(model))
    out = lm_eval.simple_evaluate(
        model=lm, tasks=configs, num_fewshot=num_fewshot, limit=limit, log_samples=log_samples,
        apply_chat_template=apply_chat_template, task_manager=TaskManager(include_defaults=False),
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        bootstrap_iters=1000,
    )
    n_samples = out.get("n-samples", {})
    result: dict[str, Any] = {"model": name, "lm_eval_version": _lm_eval_version(), "limit": limit, "tasks": {},
                              "configs": {c["task"]: c for c in configs}}
    for task, task_result in out["results"].items():
        metrics = _metrics(task_result)
        n = n_samples.get(task, {}).get("effective")
        if n is not None:
            metrics["n"] = int(n)
        result["tasks"][task] = metrics
    if log_samples:
        result["samples"] = out.get("samples", {})
    return result


def _max_length(model) -> int:
    return int(min(getattr(model.config, "max_position_embeddings", None) or 2048, 2048))


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def render_harness(result: dict, *, console=None) -> None:
    """One row per task and metric: value ± stderr."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"lm-eval {result['lm_eval_version']}: {result['model']}"
                        + (f" (limit {result['limit']})" if result["limit"] else ""))
    for col in ("task", "n", "metric", "value", "± stderr"):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for task, metrics in result["tasks"].items():
        for metric, value in metrics.items():
            if metric == "n" or metric.endswith("_stderr") or "_stderr," in metric:
                continue
            stderr = metrics.get(f"{metric}_stderr")
            table.add_row(task, str(metrics.get("n", "")), metric, f"{value:.4f}",
                          "" if stderr is None else f"{stderr:.4f}")
    console.print(table)
