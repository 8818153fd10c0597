#!/usr/bin/env bash
# record.sh: run a command and keep a record of it, as the ViTFreeze commands do:
#
#   bash record.sh CUDA_VISIBLE_DEVICES=0,1,2,3 OMP_NUM_THREADS=1 \
#       python -m torch.distributed.launch --nproc_per_node=4 main_pretrain.py --config ... --accum_iter 2
#
# Leading VAR=value words set the command's environment. Writes records/<date>_<time>_<pid>/ (or $RECORD_DIR):
#   command.txt  the command line as typed (shell-quoted), working directory, host, git commit and dirty flag,
#                start and end time, exit status
#   output.log   everything the command printed on stdout and stderr, every rank included (also shown live)
# Exits with the command's exit status. Each run also writes cli_logs.txt and run_info.json in its --output_dir.
set -uo pipefail

if [[ $# -eq 0 || $1 == -h || $1 == --help ]]; then
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
    [[ $# -eq 0 ]] && exit 2 || exit 0
fi
dir=${RECORD_DIR:-records/$(date +%Y%m%d_%H%M%S)_$$}
mkdir -p "$dir" || exit 1
commit=none
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    commit=$(git rev-parse HEAD 2>/dev/null || echo none)
    git diff --quiet HEAD 2>/dev/null || commit="$commit (dirty)"
fi
{
    printf 'command:'; printf ' %q' "$@"; printf '\n'
    echo "cwd: $PWD"
    echo "host: $(hostname)"
    echo "git: $commit"
    echo "start: $(date -Is)"
} > "$dir/command.txt"
echo "[record.sh] recording into $dir" >&2
env "$@" 2>&1 | tee "$dir/output.log"
status=${PIPESTATUS[0]}
{ echo "end: $(date -Is)"; echo "exit status: $status"; } >> "$dir/command.txt"
exit "$status"
