"""Checkpoint and resume: bitwise equal results, safe loading and atomic writes."""

from __future__ import annotations

import functools
import logging
import os

import pytest
import torch

from rtrl_moe import CheckpointError, CircularSegmentTree, RecurrentMoE
from rtrl_moe.checkpoint import FORMAT_VERSION, read_checkpoint
from rtrl_moe.tasks import AnBn, Haystack
from rtrl_moe.training import TrainConfig, Trainer

LENGTH = 8
SEQUENCES = 3
BATCH = 2


def make_task() -> Haystack:
    return Haystack(length=LENGTH, n_values=3, n_distractors=2)


def make_model(n_slots: int = 4, dtype: torch.dtype = torch.float64) -> RecurrentMoE:
    torch.manual_seed(0)
    task = make_task()
    model = RecurrentMoE(task.d_in, task.d_out, d_model=8, n_heads=2, n_slots=n_slots,
                         n_experts=4, k_experts=2, k_read=2, k_write=2)
    return model.to(dtype)


class RecordingAdam(torch.optim.Adam):
    """Adam that keeps a copy of the gradients of every step it takes."""

    def __init__(self, params, **options) -> None:
        super().__init__(params, **options)
        self.seen: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        self.seen.append([p.grad.clone() for group in self.param_groups for p in group["params"]])
        return super().step(closure)


def recording_factory(params) -> RecordingAdam:
    return RecordingAdam(params, lr=2e-3)


def make_trainer(method: str, update_every: int | None, capacity: int | None,
                 dtype: torch.dtype = torch.float64, **settings) -> Trainer:
    model = make_model(dtype=dtype)
    config = TrainConfig(method=method, sequences=SEQUENCES, batch_size=BATCH,
                         update_every=update_every, capacity=capacity, seed=5, **settings)
    return Trainer(model, make_task(), config, recording_factory(model.parameters()))


@functools.lru_cache(maxsize=None)
def reference_run(method: str, update_every: int | None, capacity: int | None,
                  dtype: torch.dtype) -> Trainer:
    """Return a trainer that ran to the end without interruption."""
    trainer = make_trainer(method, update_every, capacity, dtype)
    trainer.run()
    return trainer


def assert_same_run(resumed: Trainer, reference: Trainer) -> None:
    """Check parameters, optimizer state, gradients and metrics (but wall time) bitwise."""
    for (name, p), q in zip(reference.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), f"parameter {name} differs"

    reference_state = reference.optimizer.state_dict()["state"]
    resumed_state = resumed.optimizer.state_dict()["state"]
    assert reference_state.keys() == resumed_state.keys()
    for index, slots in reference_state.items():
        for key, value in slots.items():
            assert torch.equal(value, resumed_state[index][key]), f"optimizer {key} of {index}"

    seen = resumed.optimizer.seen
    assert len(seen) > 0
    for offset, gradients in enumerate(reference.optimizer.seen[-len(seen):]):
        for expected, actual in zip(gradients, seen[offset]):
            assert torch.equal(expected, actual), f"gradient of update {offset} differs"

    columns = [c for c in reference.metrics.columns if c != "wall_time"]
    assert list(resumed.metrics.columns) == list(reference.metrics.columns)
    assert resumed.metrics[columns].equals(reference.metrics[columns])
    assert resumed.updates == reference.updates


# (method, update_every, capacity, dtype, updates at which the run is interrupted)
RESUME_CASES = {
    "bptt-truncated-mid-sequence": ("bptt", 3, None, torch.float64, [4]),
    "bptt-full-sequence-boundary": ("bptt", None, None, torch.float64, [1]),
    "sparse-online-mid-sequence": ("rtrl-sparse", 3, None, torch.float64, [2]),
    "sparse-float32-boundary": ("rtrl-sparse", None, None, torch.float32, [2]),
    "lazy-online-twice": ("rtrl-lazy", 3, 3, torch.float64, [2, 4]),
    "lazy-wrapped-tree-boundary": ("rtrl-lazy", None, 3, torch.float64, [1]),
    "lazy-float32-mid-sequence": ("rtrl-lazy", 3, 2, torch.float32, [5]),
}


@pytest.mark.parametrize("case", list(RESUME_CASES.values()), ids=list(RESUME_CASES))
def test_resume_is_bitwise(case, tmp_path):
    method, update_every, capacity, dtype, stops = case
    reference = reference_run(method, update_every, capacity, dtype)
    path = tmp_path / "run.pt"

    trainer = make_trainer(method, update_every, capacity, dtype)
    trainer.run(checkpoint_path=path, max_updates=stops[0])
    assert trainer.updates == stops[0]
    for stop in stops[1:]:
        trainer = Trainer.from_checkpoint(path, make_task(), optimizer_factory=recording_factory)
        trainer.run(checkpoint_path=path, max_updates=stop)
        assert trainer.updates == stop

    resumed = Trainer.from_checkpoint(path, make_task(), optimizer_factory=recording_factory)
    resumed.run()
    assert_same_run(resumed, reference)


def test_stop_then_continue_in_process():
    reference = reference_run("rtrl-lazy", 3, 3, torch.float64)
    trainer = make_trainer("rtrl-lazy", 3, 3)
    trainer.run(max_updates=4)
    trainer.run()
    assert_same_run(trainer, reference)


def test_interrupt_mid_sequence_saves_position(tmp_path):
    path = tmp_path / "run.pt"
    trainer = make_trainer("rtrl-lazy", 3, 3)
    trainer.run(checkpoint_path=path, max_updates=2)

    saved = read_checkpoint(path)["trainer"]
    assert saved["updates"] == 2
    assert saved["rows"] == []
    assert saved["progress"]["step"] == 6


def test_lazy_tree_restored_with_leaves(tmp_path):
    path = tmp_path / "run.pt"
    trainer = make_trainer("rtrl-lazy", 3, 3)
    trainer.run(checkpoint_path=path, max_updates=2)
    resumed = Trainer.from_checkpoint(path, make_task(), optimizer_factory=recording_factory)

    original, restored = trainer.engine.tree, resumed.engine.tree
    assert restored.total_pushed == original.total_pushed == 6
    assert len(restored) == len(original) == 3
    assert resumed.engine.synced_until == trainer.engine.synced_until
    for before, after in zip(original.items(), restored.items()):
        assert torch.equal(before.matrix.values, after.matrix.values)
        assert torch.equal(before.matrix.rows, after.matrix.rows)
    assert torch.equal(resumed.engine.sensitivity, trainer.engine.sensitivity)


def parenthesize(earlier: str, later: str) -> str:
    return f"({earlier}{later})"


@pytest.mark.parametrize("capacity", [1, 2, 3, 5, 6, 7])
def test_tree_restore_keeps_fold_grouping(capacity):
    tree = CircularSegmentTree(capacity, parenthesize, "")
    for count in range(3 * capacity + 1):
        restored = CircularSegmentTree.from_state_dict(tree.state_dict(), parenthesize, "")
        for start in range(len(tree) + 1):
            for stop in range(start, len(tree) + 1):
                assert restored.query(start, stop) == tree.query(start, stop), (count, start, stop)
        tree.push(str(count % 10))


def test_checkpoint_every_and_logs(tmp_path, caplog):
    path = tmp_path / "run.pt"
    trainer = make_trainer("rtrl-sparse", 3, None)
    with caplog.at_level(logging.INFO, logger="rtrl_moe"):
        trainer.run(checkpoint_path=path, checkpoint_every=2, max_updates=5)
        Trainer.from_checkpoint(path, make_task(), optimizer_factory=recording_factory)

    written = [r.getMessage() for r in caplog.records if "wrote checkpoint" in r.getMessage()]
    assert len(written) == 3, written
    assert "at update 4" in written[1]
    assert "at update 5" in written[2]
    assert any("resumed from checkpoint" in r.getMessage() for r in caplog.records)


def test_finished_run_resumes_to_nothing(tmp_path):
    path = tmp_path / "run.pt"
    trainer = make_trainer("bptt", None, None)
    trainer.run(checkpoint_path=path)
    resumed = Trainer.from_checkpoint(path, make_task(), optimizer_factory=recording_factory)
    resumed.run()
    assert resumed.updates == trainer.updates == SEQUENCES
    assert len(resumed.metrics) == SEQUENCES


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    """Return the path of a checkpoint taken in the middle of a lazy run."""
    path = tmp_path_factory.mktemp("saved") / "run.pt"
    trainer = make_trainer("rtrl-lazy", 3, 3)
    trainer.run(checkpoint_path=path, max_updates=2)
    return path


def test_random_bytes_rejected(tmp_path):
    path = tmp_path / "random.pt"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*truncated, corrupted"):
        read_checkpoint(path)


def test_truncated_file_rejected(saved_checkpoint, tmp_path):
    data = saved_checkpoint.read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*truncated"):
        Trainer.from_checkpoint(path, make_task(), optimizer_factory=recording_factory)


@pytest.mark.parametrize("content", [{"weights": torch.zeros(3)}, torch.ones(2), [1, 2]],
                         ids=["dict", "tensor", "list"])
def test_non_checkpoint_rejected(content, tmp_path):
    path = tmp_path / "other.pt"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match="is not an rtrl_moe checkpoint"):
        Trainer.from_checkpoint(path, make_task())


def test_arbitrary_object_rejected(tmp_path):
    path = tmp_path / "object.pt"
    torch.save({"format": "rtrl_moe.checkpoint", "task": make_task()}, path)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_checkpoint(path)


def rewrite(saved, tmp_path, change) -> os.PathLike:
    payload = torch.load(saved, weights_only=True)
    change(payload)
    path = tmp_path / "changed.pt"
    torch.save(payload, path)
    return path


def test_other_format_version_rejected(saved_checkpoint, tmp_path):
    path = rewrite(saved_checkpoint, tmp_path, lambda p: p.update(version=FORMAT_VERSION + 1))
    with pytest.raises(CheckpointError, match=f"format version {FORMAT_VERSION + 1}"):
        read_checkpoint(path)


def test_missing_section_rejected(saved_checkpoint, tmp_path):
    path = rewrite(saved_checkpoint, tmp_path, lambda p: p.pop("engine"))
    with pytest.raises(CheckpointError, match="missing its 'engine' section"):
        read_checkpoint(path)


def test_damaged_engine_state_rejected(saved_checkpoint, tmp_path):
    def shrink(payload):
        state = payload["engine"]["state"]
        state["sensitivity"] = state["sensitivity"][:, :-1]

    path = rewrite(saved_checkpoint, tmp_path, shrink)
    with pytest.raises(CheckpointError, match="saved sensitivity has shape"):
        Trainer.from_checkpoint(path, make_task(), optimizer_factory=recording_factory)


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "absent.pt"
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        Trainer.from_checkpoint(path, make_task())


def test_other_n_slots_rejected(saved_checkpoint):
    model = make_model(n_slots=3)
    trainer = Trainer(model, make_task(), TrainConfig(method="rtrl-lazy", sequences=SEQUENCES,
                                                      batch_size=BATCH, update_every=3,
                                                      capacity=3, seed=5))
    with pytest.raises(CheckpointError, match="checkpoint model n_slots=4 does not match n_slots=3"):
        trainer.load_checkpoint(saved_checkpoint)


@pytest.mark.parametrize("settings, pattern", [
    ({"method": "bptt"}, "checkpoint method='rtrl-lazy' does not match method='bptt'"),
    ({"method": "rtrl-sparse"}, "method='rtrl-lazy' does not match method='rtrl-sparse'"),
    ({"method": "rtrl-lazy", "capacity": 4}, "checkpoint capacity=3 does not match capacity=4"),
    ({"method": "rtrl-lazy", "capacity": 3, "update_every": 4},
     "checkpoint update_every=3 does not match update_every=4"),
])
def test_other_config_rejected(settings, pattern, saved_checkpoint):
    settings = {"update_every": 3, **settings}
    trainer = Trainer(make_model(), make_task(), TrainConfig(batch_size=BATCH, seed=5, **settings))
    with pytest.raises(CheckpointError, match=pattern):
        trainer.load_checkpoint(saved_checkpoint)


def test_other_dtype_rejected(saved_checkpoint):
    trainer = Trainer(make_model(dtype=torch.float32), make_task(),
                      TrainConfig(method="rtrl-lazy", batch_size=BATCH, update_every=3,
                                  capacity=3, seed=5))
    with pytest.raises(CheckpointError,
                       match="checkpoint dtype float64 does not match the model dtype float32"):
        trainer.load_checkpoint(saved_checkpoint)


def test_other_task_rejected(saved_checkpoint):
    with pytest.raises(CheckpointError, match=r"checkpoint task Haystack\(length=8.* does not "
                                              r"match task Haystack\(length=10"):
        Trainer.from_checkpoint(saved_checkpoint, Haystack(length=10, n_values=3, n_distractors=2))
    with pytest.raises(CheckpointError, match="does not match task AnBn"):
        Trainer.from_checkpoint(saved_checkpoint, AnBn())


def test_other_optimizer_rejected(saved_checkpoint):
    def sgd(params):
        return torch.optim.SGD(params, lr=0.1)

    with pytest.raises(CheckpointError, match="optimizer RecordingAdam does not match SGD"):
        Trainer.from_checkpoint(saved_checkpoint, make_task(), optimizer_factory=sgd)


def test_run_settings_may_differ(saved_checkpoint):
    trainer = Trainer(make_model(), make_task(),
                      TrainConfig(method="rtrl-lazy", sequences=SEQUENCES + 2, batch_size=BATCH,
                                  update_every=3, capacity=3, seed=5, on_nonfinite="skip",
                                  memory_budget=2**40),
                      recording_factory(make_model().parameters()))
    trainer.load_checkpoint(saved_checkpoint)
    assert trainer.updates == 2


class WriteFailure(RuntimeError):
    pass


def test_crash_in_save_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "run.pt"
    trainer = make_trainer("rtrl-sparse", 3, None)
    trainer.run(checkpoint_path=path, max_updates=2)
    good = path.read_bytes()

    def partial_save(payload, file, *args, **kwargs):
        file.write(b"PK\x03\x04 partial checkpoint")
        raise WriteFailure("disk full")

    monkeypatch.setattr(torch, "save", partial_save)
    trainer.run(max_updates=3)
    with pytest.raises(WriteFailure):
        trainer.save_checkpoint(path)
    monkeypatch.undo()

    assert sorted(os.listdir(tmp_path)) == ["run.pt"]
    assert path.read_bytes() == good
    assert read_checkpoint(path)["trainer"]["updates"] == 2


def test_crash_in_replace_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "run.pt"
    trainer = make_trainer("bptt", 3, None)
    trainer.run(checkpoint_path=path, max_updates=1)

    def failing_replace(source, target):
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        trainer.run(checkpoint_path=path, max_updates=2)
    monkeypatch.undo()

    assert sorted(os.listdir(tmp_path)) == ["run.pt"]
    resumed = Trainer.from_checkpoint(path, make_task(), optimizer_factory=recording_factory)
    assert resumed.updates == 1


def test_bptt_state_needs_update_boundary():
    trainer = make_trainer("bptt", None, None)
    batch = make_task().sample(BATCH, trainer.generator).to(torch.float64)
    trainer.engine.begin(BATCH)
    trainer.engine.step(batch.inputs[:, 0], batch.targets[:, 0])
    trainer.engine.step(batch.inputs[:, 1], torch.zeros(BATCH, dtype=torch.long))
    with pytest.raises(RuntimeError, match="parameter-update boundary"):
        trainer.engine.state_dict()


@pytest.mark.parametrize("arguments, pattern", [
    ({"checkpoint_every": 2}, "checkpoint_every=2 needs checkpoint_path"),
    ({"checkpoint_path": "x.pt", "checkpoint_every": 0}, "checkpoint_every must be >= 1"),
    ({"max_updates": 0}, "max_updates must be >= 1"),
    ({"max_updates": 1.5}, "max_updates must be an integer, got 1.5"),
    ({"checkpoint_path": 3}, "checkpoint_path must be a non-empty str"),
    ({"checkpoint_path": ""}, "checkpoint_path must be a non-empty str"),
])
def test_bad_run_arguments(arguments, pattern, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = make_trainer("bptt", None, None)
    with pytest.raises(ValueError, match=pattern):
        trainer.run(**arguments)


def test_checkpoint_directory_must_exist(tmp_path):
    trainer = make_trainer("bptt", None, None)
    with pytest.raises(FileNotFoundError, match="missing"):
        trainer.run(checkpoint_path=tmp_path / "missing" / "run.pt")
    with pytest.raises(ValueError, match="must name a file"):
        trainer.run(checkpoint_path=tmp_path)
