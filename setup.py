from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent


def read_requirements(name: str) -> list[str]:
    """A requirements file without comments (whole-line or trailing) and without the test tools."""
    lines = (line.split("#", 1)[0].strip() for line in (here / name).read_text().splitlines())
    return [spec for spec in lines if spec and not spec.startswith(("pytest", "import-linter"))]


requirements = read_requirements("requirements.txt")

setup(
    name="branchgrpo",
    version="0.1.0",
    description="Tree-structured GRPO (BranchGRPO), DanceGRPO, MixGRPO and G2RPO for flow-matching generators",
    long_description=(here / "README.md").read_text() if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["branchgrpo", "branchgrpo.*"]),
    include_package_data=True,
    package_data={"branchgrpo": ["toy/assets/*", "assets/*", "models/configs/*.json"]},
    install_requires=requirements,
    # `pip install branchgrpo[rewards]`: the OCR and VLM-judge rewards' packages (docs/rewards.md)
    extras_require={"wandb": ["wandb"], "rewards": read_requirements("requirements-rewards.txt")},
    # the same commands as `python -m branchgrpo.cli.<name>` (and `python -m branchgrpo.plan` / `.make_tiny`)
    entry_points={"console_scripts": [
        f"branchgrpo-{name.replace('_', '-')}=branchgrpo.cli.{name}:main"
        for name in ("train", "preprocess", "eval", "plan", "make_tiny", "compare", "diversity", "pretrain_toy")
    ]},
)
