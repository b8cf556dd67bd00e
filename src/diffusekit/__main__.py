"""`python -m diffusekit ...`: the same command as `diffusekit ...`."""
from .cli import main

if __name__ == "__main__":
    main()
