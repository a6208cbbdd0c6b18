"""Downstream tasks: the original 22 names and their folders, or a self-describing folder of one's own.

A task is training shards (image + ``cls``/``label`` [+ ``txt``]), class names and zero-shot templates
(each with ``{c}``), and for evaluation test shards. Self-describing layout, one folder per task:
``train/*.tar``, ``test/*.tar``, ``classnames.txt``, ``zeroshot_classification_templates.txt``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flyt.data.shards import list_shards
from flyt.errors import FlytError

CLASSNAMES = "classnames.txt"
TEMPLATES = "zeroshot_classification_templates.txt"
NSHARDS = "nshards.txt"  # in test/: how many shards clip_benchmark reads (0.tar ...)

# task -> (folder under --downstream_data_dir, folder under --datacomp_eval_dir), as the original lays them out
ORIGINAL_TASKS: dict[str, tuple[str, str]] = {
    "imagenet": ("imagenet_oai_templates", "wds_imagenet1k_test"),
    "mnist": ("mnist", "wds_mnist_test"),
    "svhn": ("svhn_cropped", "wds_vtab-svhn_test"),
    "cifar10": ("cifar10", "wds_cifar10_test"),
    "cifar100": ("cifar100", "wds_vtab-cifar100_test"),
    "food101": ("food-101", "wds_food101_test"),
    "flowers102": ("flowers102", "wds_vtab-flowers_test"),
    "pet": ("pet", "wds_vtab-pets_test"),
    "iwildcam": ("iwildcam", "wds_wilds-iwildcam_test"),
    "sun397": ("sun397", "wds_sun397_test"),
    "eurosat": ("eurosat", "wds_vtab-eurosat_test"),
    "cars": ("cars", "wds_cars_test"),
    "dtd": ("dtd", "wds_vtab-dtd_test"),
    "resisc45": ("resisc45", "wds_vtab-resisc45_test"),
    "gtsrb": ("gtsrb", "wds_gtsrb_test"),
    "aircraft": ("aircraft", "wds_fgvc_aircraft_test"),
    "voc": ("voc", "wds_voc2007_test"),
    "country": ("country", "wds_country211_test"),
    "rendered_sst2": ("rendered_sst2", "wds_renderedsst2_test"),
    "fmow": ("fmow", "wds_wilds-fmow_test"),
    "dollar_street": ("dollar_street", "wds_dollar_street_test"),
    "stl10": ("stl10", "wds_stl10_test"),
}


@dataclass(frozen=True)
class Task:
    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    train_dir: Path | None = None  # training shards (FLYT's downstream data)
    test_dir: Path | None = None  # evaluation shards

    def prompts(self, template_ids) -> list[str]:
        """One prompt per class: class c formatted into template ``template_ids[c]``."""
        return [self.templates[t].replace("{c}", c) for t, c in zip(template_ids, self.classnames)]


def _read_lines(path: Path, what: str) -> tuple[str, ...]:
    if not path.is_file():
        raise FlytError(f"missing {what} file {path}")
    lines = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    if not lines:
        raise FlytError(f"{path} is empty (expected one {what[:-1] if what.endswith('s') else what} per line)")
    return lines


def read_text_files(folder: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Class names and templates of an eval folder; every template must contain ``{c}``."""
    classnames = _read_lines(folder / CLASSNAMES, "classnames")
    templates = _read_lines(folder / TEMPLATES, "templates")
    for t in templates:
        if "{c}" not in t:
            raise FlytError(f"{folder / TEMPLATES}: template {t!r} has no {{c}} placeholder for the class name")
    return classnames, templates


def test_shards(task: Task) -> list[str]:
    """A task's test shards. clip_benchmark's ``test/nshards.txt``, where there, must count them: with a
    shard lost, every metric would be one over part of the test set."""
    shards = list_shards(task.test_dir, f"test shards of task {task.name!r}")
    count_file = Path(task.test_dir) / NSHARDS
    if count_file.is_file():
        text = count_file.read_text(encoding="utf-8", errors="replace").strip()
        if not text.isdigit():
            raise FlytError(f"{count_file}: expected the number of test shards, not {text[:40]!r}")
        if int(text) != len(shards):
            raise FlytError(f"{count_file} says {int(text)} test shards but {task.test_dir} holds {len(shards)} "
                            f".tar files")
    return shards


def task_folder(root: Path, token: str) -> Path | None:
    """``root/token`` or DataComp's ``root/wds_<token>_test``, whichever holds the class names."""
    return next((f for f in (root / token, root / f"wds_{token}_test") if (f / CLASSNAMES).is_file()), None)


def task_name(folder: Path) -> str:
    """A task folder's name, DataComp's ``wds_<task>_test`` read as ``<task>``."""
    name = folder.name
    return name[4:-5] if name.startswith("wds_") and name.endswith("_test") and len(name) > 9 else name


def resolve_task(token: str, downstream_data_dir: str | None = None, datacomp_eval_dir: str | None = None) -> Task:
    """A task from an original name (with the two root folders) or a self-describing folder.

    A name is looked up first as a folder of the simple layout under ``downstream_data_dir`` (``<name>``
    or ``wds_<name>_test``), then in the original table; anything else must be a path to a task folder.
    """
    folder = task_folder(Path(downstream_data_dir), token) if downstream_data_dir else None
    if folder is not None:
        return _simple_task(folder)
    if token in ORIGINAL_TASKS and (downstream_data_dir or datacomp_eval_dir):
        train_folder, eval_folder = ORIGINAL_TASKS[token]
        if not datacomp_eval_dir:
            raise FlytError(f"task {token!r}: --datacomp_eval_dir is needed for its class names and templates")
        eval_dir = Path(datacomp_eval_dir) / eval_folder
        classnames, templates = read_text_files(eval_dir)
        train_dir = Path(downstream_data_dir) / train_folder if downstream_data_dir else None
        return Task(token, classnames, templates, train_dir, eval_dir / "test")
    path = Path(token)
    if path.is_dir():
        return _simple_task(path)
    known = ", ".join(sorted(ORIGINAL_TASKS))
    raise FlytError(f"unknown task {token!r}: expected one of {known} (with --downstream_data_dir and "
                    f"--datacomp_eval_dir), or a folder holding {CLASSNAMES} and {TEMPLATES}")


def _simple_task(folder: Path) -> Task:
    classnames, templates = read_text_files(folder)
    train = folder / "train" if (folder / "train").is_dir() else folder
    return Task(task_name(folder), classnames, templates, train, folder / "test")


def parse_task_names(spec: str, downstream_data_dir: str | None, datacomp_eval_dir: str | None) -> list[Task]:
    names = [n for n in spec.split("::") if n]
    if not names:
        raise FlytError("--downstream_task_names is empty")
    return [resolve_task(n, downstream_data_dir, datacomp_eval_dir) for n in names]
