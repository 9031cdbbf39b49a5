"""`python -m elastic_mdm.commands COMMAND ...`: the same as `elastic-mdm COMMAND ...`."""

from . import main

if __name__ == "__main__":
    main()
