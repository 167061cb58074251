"""`python -m launch ...` == `dedistill ...`."""

from launch.cli import main

if __name__ == "__main__":
    main()
