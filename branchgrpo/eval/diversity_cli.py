"""`python -m branchgrpo.eval.diversity_cli`: an alias of branchgrpo.cli.diversity (the README and users call it by
this name)."""

from branchgrpo.cli.diversity import main

if __name__ == "__main__":
    main()
