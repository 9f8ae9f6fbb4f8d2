"""Store lists: a cohort-level job names every slide's store through one file, one path per line, that
`dirl <command> @list` reads as its arguments — not through thousands of inputs and arguments.

At 10,000 slides the tile stores alone make a ~0.5 MB command line (Linux refuses one argument past
128 KiB: `bash -c` gets the whole command as one), and every per-slide job that needs a cohort-level
output (extraction a backbone, export the MIL attention) made Snakemake scan that job's list of every
slide's store: planning grew with the square of the cohort. A list depends on its stores, so a store
written anew still reruns what reads it.
"""


rule store_list:
    input:
        listed_stores,
    output:
        f"{RESULTS}/lists/{{subset}}/{{kind}}.txt",
    log:
        f"{LOGS}/lists/{{subset}}/{{kind}}.log",
    wildcard_constraints:
        subset="|".join(LIST_SETS),
        kind="|".join(re.escape(k) for k in list_kinds()),
    localrule: True
    run:
        write_list(input, output[0], log[0])
