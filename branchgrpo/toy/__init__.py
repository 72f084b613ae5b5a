"""The embedded default: a tiny text-conditioned flow model of real 8x8 handwritten digits, with real offline
rewards, so that BranchGRPO can be watched aligning a model on a laptop CPU and the trainer's tests need no GPU and
no download.

- `data.py`      the real digits (sklearn), their measured attributes, the prompt grammar (`parse_prompt`) and the
                 prompt lists (`train_prompts_path()`, `eval_prompts_path()`)
- `network.py`   the word-level text encoder and the flow transformer (bitwise batch-invariant on CPU)
- `reward.py`    rewards "toy" (= "toy_digit" x "toy_style"), registered with branchgrpo.rewards
- `pretrain.py`  `python -m branchgrpo.cli.pretrain_toy --out DIR`, which produced `assets/`
- `assets/`      the shipped checkpoint, reward classifier and ramps, prompt lists, pretrain_report.json
- `edit.py`      the edit toy's instruction grammar ("make it bolder", "turn it into a seven") and exact edits of
                 real digits (models/toy_edit.py, rewards/toy_edit.py, docs/editing.md section 9)
- `edit_assets/` the edit toy's checkpoint, reward thresholds, built-in JSONL edits with their source PNGs, report

The FlowAdapter is in `branchgrpo.models.toy` (`load_toy`, `ToyAdapter`, `build_prompt_encoder`).
"""

from branchgrpo.toy.data import eval_prompts_path, parse_prompt, train_prompts_path  # noqa: F401
