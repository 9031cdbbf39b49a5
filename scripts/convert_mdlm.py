"""Convert an MDLM checkpoint (Hub id or local folder) into an Elastic-MDM folder with a new gap head.

    python scripts/convert_mdlm.py kuleshov-group/mdlm-owt outputs/mdlm-owt-elastic --tokenizer gpt2
    python scripts/convert_mdlm.py path/to/mdlm outputs/mdlm-elastic --max_gap 2048 --objective elastic

Options: --dtype, --max_shard_size, --seed, --tokenizer, --revision, --overwrite; any other `--field value` is an
ElasticMDMConfig override (values parsed as JSON: `--time_conditioning true`).
"""

import sys

from elastic_mdm.commands.convert import run_cli
from elastic_mdm.conversion.convert import convert_mdlm_checkpoint

if __name__ == "__main__":
    run_cli(convert_mdlm_checkpoint, sys.argv[1:], __doc__)
