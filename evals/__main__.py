"""`python -m evals sample|eval|fid ...` == `dedistill sample|eval|fid ...`."""

from launch.cli import main

if __name__ == "__main__":
    main()
