"""`python -m elastic_mdm.serving PATH ...`: the same as `elastic-mdm serve PATH ...`."""

from .cli import serve_main

if __name__ == "__main__":
    serve_main()
