"""Sample from any Elastic-MDM (or MDLM-objective) checkpoint: a local folder or a Hub id.

    python scripts/generate.py outputs/tiny-elastic --num_return_sequences 8 --num_steps 64 --schedule exponential
    python scripts/generate.py outputs/tiny-elastic --template '{"name":"<mask>","age":<mask>}'

`python scripts/generate.py --help` lists every flag. The command is `elastic_mdm.commands.generate.main`.
"""

from elastic_mdm.commands.generate import main

if __name__ == "__main__":
    main()
