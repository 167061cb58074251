"""`python -m dataset_tools tiny-model|tiny-data|data ...` == `dedistill tiny-model|tiny-data|data ...`."""

from launch.cli import main

if __name__ == "__main__":
    main()
