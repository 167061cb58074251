"""`python -m train CONFIG [a.b=value ...]` == `dedistill train ...` (the torchrun entry point)."""

from launch.cli import main

if __name__ == "__main__":
    import sys

    main(["train", *sys.argv[1:]])
