set -e
export PATH=/work/venv/bin:$PATH OMP_NUM_THREADS=1
S=/tmp/exp/big-store; H=blocks.2.hook_resid_post
[ -d $S ] || workbench capture --model tiny-relu --data builtin --hooks $H --tokens 500000 --ctx 128 --batch-size 32 --store $S > /tmp/exp/capture.log 2>&1
run() { name=$1; shift; "$@" --store $S --hook $H --d-sae 1536 --k 16 --batch-size 1024 --tokens 400000 --out /tmp/exp/bsae-$name > /tmp/exp/btrain-$name.log 2>&1; workbench eval /tmp/exp/bsae-$name --store $S --ce-sequences 0 > /tmp/exp/beval-$name.log 2>&1; echo "== $name"; grep -E "fvu|l0 " /tmp/exp/beval-$name.log; }
for s in 0 1 2; do
run topk-s$s workbench train --arch topk --seed $s
run mc-s$s workbench train --arch mutual-choice --seed $s
done
