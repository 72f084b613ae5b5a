"""Shared test setup: offline, deterministic, CPU."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # subprocesses (torchrun) too

import pytest  # noqa: E402
import torch  # noqa: E402

# The models under test are tiny: one intra-op thread is faster than two (on a busy 2-core machine each op's thread
# hand-off costs about 10 ms) and keeps the runs insensitive to whatever else the CI machine is doing. Set here for
# module-scoped fixtures too, and re-pinned after every test in case the code under test set its own.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread_and_seed():
    torch.manual_seed(0)
    yield
    torch.set_num_threads(1)


# The longest files first (measured with --durations=0 on 2 cores, 2026-12-07: 134 s for test_preemption.py down to
# 22 s for test_compare.py): with one pytest-xdist worker per core and whole files per worker (--dist loadfile), a
# long file started last would leave the other core idle while it finishes. The rest keep their order.
LONGEST_FIRST = ("test_preemption.py", "test_flux_e2e.py", "test_wan22_e2e.py", "test_qwen_image_edit.py",
                 "test_distributed.py", "test_wan_i2v_e2e.py", "test_wan_e2e.py", "test_reward_server.py",
                 "test_qwen_image_e2e.py", "test_sd3_e2e.py", "test_flux_kontext_e2e.py", "test_qwen_image_edit_e2e.py",
                 "test_resume.py", "test_wan22_ti2v_e2e.py", "test_preprocess.py", "test_compare.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
