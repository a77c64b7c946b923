set -e
export PATH=/work/venv/bin:$PATH OMP_NUM_THREADS=1
S=/tmp/exp/big-store; H=blocks.2.hook_resid_post
run() { name=$1; shift; "$@" --store $S --hook $H --d-sae 1536 --k 16 --batch-size 1024 --tokens 400000 --out /tmp/exp/bsae-$name > /tmp/exp/btrain-$name.log 2>&1; workbench eval /tmp/exp/bsae-$name --store $S --ce-sequences 0 > /tmp/exp/beval-$name.log 2>&1; echo "== $name"; tail -4 /tmp/exp/beval-$name.log; }
run topk workbench train --arch topk
run mc workbench train --arch mutual-choice
run mc-none workbench train --arch mutual-choice --aux none
run mc-oldzipf env PYTHONPATH=/tmp/exp/head python -m workbench.cli train --arch mutual-choice
