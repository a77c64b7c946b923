# Run after seed_runs.sh (it builds the store).
set -e
export PATH=/work/venv/bin:$PATH OMP_NUM_THREADS=1
S=/tmp/exp/big-store; H=blocks.2.hook_resid_post
run() { name=$1; shift; "$@" --store $S --hook $H --d-sae 1536 --k 16 --batch-size 1024 --tokens 400000 --out /tmp/exp/bsae-$name > /tmp/exp/btrain-$name.log 2>&1; workbench eval /tmp/exp/bsae-$name --store $S --ce-sequences 0 > /tmp/exp/beval-$name.log 2>&1; echo "== $name"; grep -E "fvu|l0 " /tmp/exp/beval-$name.log; }
run mc-start0-s0 workbench train --arch mutual-choice --seed 0 --topk-start 0
run mc-start0.6-s0 workbench train --arch mutual-choice --seed 0 --topk-start 0.6
run mc-start0.9-s0 workbench train --arch mutual-choice --seed 0 --topk-start 0.9
