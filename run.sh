#!/usr/bin/env bash
# dBOT-style launcher: ./run.sh JOB_NAME TASK MODEL NGPUS [CHECKPOINT] [extra flags or key=value ...]
#
#   JOB_NAME    output goes to output/JOB_NAME/TASK/ (and runs resume from there automatically)
#   TASK        a recipe (see --help); several joined with '+' run one after another
#   MODEL       a registered model name (mae_vit_base_patch16, MIM_vit_base_patch16, vit_base_patch16, ...)
#               or an architecture (tiny, small, base, large, huge; also vit_base, vit_large, ... as in the
#               dBOT commands) completed from the task's recipe
#   NGPUS       processes per node: 0 = plain python (CPU), N > 0 = torchrun --nproc_per_node=N;
#               NNODES > 1 in the environment (or --launcher slurm among the extras) submits through submitit
#   CHECKPOINT  --resume for pretraining tasks, --finetune (the pretrained backbone) for the others
#   extras      passed through and override the recipe: --flag value, or key=value (becomes --key value);
#               dBOT's / ViT-Adapter's mm-style keys are mapped: data.samples_per_gpu, lr_config.step, runner.max_epochs,
#               optimizer.lr, optimizer.paramwise_cfg.layer_decay_rate, model.backbone.drop_path_rate,
#               optimizer_config.use_fp16 (any other dotted key is an error)
#               TASK:key=value (or TASK:--flag) applies to that task of the chain only (after the common extras,
#               so it wins):
#                 ./run.sh j pretrain_demo+linprobe tiny 0 pretrain_demo:data_path=data/train linprobe:data_path=data
#   a chain     tasks after a pretraining task fine-tune / probe its output/JOB/TASK/checkpoint-last.pth (as
#               --finetune) unless --finetune (or TASK:finetune=PATH) is given; CHECKPOINT then goes to the
#               pretraining (--resume) and to the tasks before it
set -euo pipefail
cd "$(dirname "$0")"

declare -A SCRIPT CONFIG
for cfg in configs/pretrain/*.yaml; do
    name=$(basename "$cfg" .yaml); SCRIPT[pretrain_$name]=main_pretrain.py; CONFIG[pretrain_$name]=$cfg
done
add() { SCRIPT[$1]=$2; CONFIG[$1]=$3; }
add imagenet_finetune main_finetune.py configs/finetune/mae_vit_base.yaml
add linprobe          main_linprobe.py configs/linprobe/mae_vit_base_90e.yaml
add knn               main_knn.py      configs/knn/imagenet_vit_base.yaml
add cifar10_cls       main_finetune.py configs/finetune/moco_v3_cifar10.yaml
add cifar_cls         main_finetune.py configs/finetune/moco_v3_cifar100.yaml
add flwrs_cls         main_finetune.py configs/finetune/moco_v3_flowers.yaml
add pets_cls          main_finetune.py configs/finetune/moco_v3_pets.yaml
add cars_cls          main_finetune.py configs/finetune/dbot_cars.yaml
add inat_cls          main_finetune.py configs/finetune/dbot_inat18.yaml
add inat19_cls        main_finetune.py configs/finetune/dbot_inat19.yaml
add gastrovision_cls  main_finetune.py configs/finetune/mae_gastrovision.yaml
add hyperkvasir_cls   main_finetune.py configs/finetune/mae_hyperkvasir.yaml
add ade20k_seg        main_segment.py  configs/segment/upernet_vit_base_512_160k_ade20k.yaml
add cascade_coco_det   main_detect.py   configs/detect/cascade_mask_rcnn_vit_base_1x_coco.yaml
add mask_rcnn_coco_det main_detect.py   configs/detect/mask_rcnn_vit_base_3x_coco.yaml
for cfg in configs/detect/mask_rcnn_*_adapter_*.yaml; do  # the rows of ViT-Adapter's DINOv2 detection table, one task per recipe
    add "$(basename "$cfg" .yaml)" main_detect.py "$cfg"
done
UNSUPPORTED="ade20kv_seg"

usage() {
    sed -n '2,/^[^#]/{/^#/p}' "$0" | sed 's/^# \{0,1\}//'  # the header comment, not the code after it
    echo; echo "tasks:"
    for task in $(printf '%s\n' "${!SCRIPT[@]}" | sort); do
        printf '  %-52s %s --config %s\n' "$task" "${SCRIPT[$task]}" "${CONFIG[$task]}"
    done
    echo "  not supported yet (need a detection/segmentation framework): $UNSUPPORTED"
}

if [[ $# -ge 1 && ( $1 == --help || $1 == -h ) ]]; then usage; exit 0; fi
if [[ $# -lt 4 ]]; then usage >&2; echo "error: expected JOB_NAME TASK MODEL NGPUS, got $# arguments" >&2; exit 2; fi
JOB=$1; TASKS=$2; MODEL=$3; NGPUS=$4; shift 4
# Checked before any arithmetic: bash evaluates a variable's text inside $(( )) and [[ -gt ]], so a value such
# as 'a[$(cmd)]' would run cmd.
if ! [[ $NGPUS =~ ^[0-9]+$ ]]; then echo "error: NGPUS must be a number >= 0, got '$NGPUS'" >&2; exit 2; fi
NNODES=${NNODES:-1}
if ! [[ $NNODES =~ ^[1-9][0-9]*$ ]]; then echo "error: NNODES must be a number >= 1, got '$NNODES'" >&2; exit 2; fi
# Bounded before the arithmetic too: 20 digits wrap around in bash's 64-bit integers.
MAX_NGPUS=64; MAX_NNODES=1024
digits=${NGPUS#"${NGPUS%%[!0]*}"}  # without leading zeros
if [[ ${#digits} -gt 4 ]] || (( 10#${digits:-0} > MAX_NGPUS )); then
    echo "error: NGPUS must be 0..$MAX_NGPUS (processes per node), got '$NGPUS'" >&2; exit 2
fi
digits=${NNODES#"${NNODES%%[!0]*}"}
if [[ ${#digits} -gt 4 ]] || (( 10#$digits > MAX_NNODES )); then
    echo "error: NNODES must be 1..$MAX_NNODES, got '$NNODES'" >&2; exit 2
fi
NGPUS=$((10#$NGPUS)); NNODES=$((10#$NNODES))
if [[ -z $JOB || $JOB == *..* || $JOB == */* || $JOB == -* || $JOB == [[:space:]]* || $JOB == *[[:cntrl:]]* ]]; then
    printf -v shown '%q' "$JOB"
    echo "error: JOB_NAME must be a plain folder name under output/ (no '/', '..', leading '-' or space, or control" \
         "characters), got $shown" >&2
    exit 2
fi
for arg in "$TASKS" "$MODEL" "$@"; do  # a newline would cut a value short (lr_config.step=$'8\n11' -> 8)
    if [[ $arg == *[[:cntrl:]]* ]]; then
        printf -v shown '%q' "$arg"
        echo "error: argument $shown holds a newline or another control character; pass plain text" >&2; exit 2
    fi
done
CKPT=""
if [[ $# -gt 0 && $1 != -* && $1 != *=* ]]; then CKPT=$1; shift; fi
mm_override() {  # KEY VALUE of an mm-style override (dBOT's / ViT-Adapter's OpenMMLab configs) -> our flags in MAPPED
    local key=$1 value=$2
    case $key in
        data.samples_per_gpu) MAPPED=(--batch_size "$value");;
        lr_config.step) IFS=',' read -ra steps <<< "$value"; MAPPED=(--lr_steps "${steps[@]}");;
        runner.max_epochs) MAPPED=(--epochs "$value");;
        optimizer.lr) MAPPED=(--lr "$value");;
        optimizer.paramwise_cfg.layer_decay_rate) MAPPED=(--layer_decay "$value");;
        model.backbone.drop_path_rate) MAPPED=(--drop_path "$value");;
        optimizer_config.use_fp16)
            case ${value,,} in true) MAPPED=(--amp fp16);; false) MAPPED=(--amp none);;
                *) echo "error: optimizer_config.use_fp16 takes True or False, got '$value'" >&2; exit 2;; esac;;
        *) echo "error: unknown override '$key' (mm-style keys known here: data.samples_per_gpu, lr_config.step," \
                "runner.max_epochs, optimizer.lr, optimizer.paramwise_cfg.layer_decay_rate," \
                "model.backbone.drop_path_rate, optimizer_config.use_fp16)" >&2; exit 2;;
    esac
}
EXTRA=()
TASK_OF=() TASK_ARG=()  # TASK:key=value overrides, one flag or value per entry, with the task it is for
for arg in "$@"; do
    prefix=${arg%%:*}
    if [[ ( $arg == *:*=* || $arg == *:--* ) && $arg != -* && $prefix != *=* && $prefix != */* ]]; then
        if [[ -z ${SCRIPT[$prefix]:-} ]]; then
            echo "error: '$arg': '$prefix' is not a task (./run.sh --help lists them)" >&2; exit 2
        fi
        override=${arg#*:}; key=${override%%=*}
        if [[ $override == -* ]]; then MAPPED=("$override")  # TASK:--flag, TASK:--flag=value
        elif [[ $key == *.* ]]; then mm_override "$key" "${override#*=}"; else MAPPED=("--$key" "${override#*=}"); fi
        for token in "${MAPPED[@]}"; do TASK_OF+=("$prefix"); TASK_ARG+=("$token"); done
    elif [[ $arg == *=* && $arg != -* ]]; then
        key=${arg%%=*}
        if [[ $key == *.* ]]; then mm_override "$key" "${arg#*=}"; EXTRA+=("${MAPPED[@]}")
        else EXTRA+=("--$key" "${arg#*=}"); fi
    else
        EXTRA+=("$arg")
    fi
done

LAUNCHER=""  # --launcher slurm|local among the extras
for i in "${!EXTRA[@]}"; do
    case ${EXTRA[i]} in --launcher) LAUNCHER=${EXTRA[i+1]:-};; --launcher=*) LAUNCHER=${EXTRA[i]#*=};; esac
done

if [[ $NGPUS -gt 0 && $NNODES -eq 1 && -z $LAUNCHER ]] && command -v nvidia-smi >/dev/null; then  # torchrun here
    visible=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
    if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then  # the processes see only these
        IFS=',' read -ra listed <<< "$CUDA_VISIBLE_DEVICES"; (( ${#listed[@]} < visible )) && visible=${#listed[@]}
    fi
    if [[ $visible -gt 0 && $NGPUS -gt $visible ]]; then
        echo "error: NGPUS=$NGPUS but this node has $visible visible GPU(s) (nvidia-smi -L, CUDA_VISIBLE_DEVICES);" \
             "pass at most $visible, or 0 for the CPU" >&2; exit 2
    fi
fi

IFS='+' read -ra TASK_LIST <<< "$TASKS"
for task in "${TASK_LIST[@]}"; do  # check every task before starting any
    if [[ " $UNSUPPORTED " == *" $task "* ]]; then
        echo "error: task '$task' needs a detection/segmentation framework and is not supported yet" >&2; exit 2
    fi
    if [[ -z ${SCRIPT[$task]:-} ]]; then
        echo "error: unknown task '$task' (./run.sh --help lists them)" >&2; exit 2
    fi
    if [[ ! -f ${CONFIG[$task]} ]]; then echo "error: task '$task': recipe ${CONFIG[$task]} is missing" >&2; exit 2; fi
done

model_name() {  # full name as given, or an architecture completed with the recipe's model family
    local task=$1 family
    local arch=${MODEL#vit_}  # dBOT's commands say vit_base / vit_large / base / large
    if ! [[ $arch =~ ^(tiny|small|base|large|huge)$ ]]; then echo "$MODEL"; return; fi
    local recipe_model; recipe_model=$(sed -n 's/^model: *//p' "${CONFIG[$task]}")
    if [[ $recipe_model == adapter_* ]]; then echo "${recipe_model%_*}_${arch}"; return; fi  # adapter_[dinov2_]ARCH
    local patch=16; [[ $arch == huge ]] && patch=14
    family=$(sed -n 's/^model: *\([A-Za-z]*_\)\{0,1\}vit_.*/\1/p' "${CONFIG[$task]}")
    echo "${family}vit_${arch}_patch${patch}"
}

for task in "${TASK_OF[@]}"; do  # an override for a task that is not in this chain would be silently lost
    if [[ "+$TASKS+" != *"+$task+"* ]]; then
        echo "error: '$task:...' overrides a task that is not in the chain '$TASKS'" >&2; exit 2
    fi
done

declare -A CHAINED  # task -> the checkpoint-last.pth of the pretraining before it in the chain
produced=""
for task in "${TASK_LIST[@]}"; do
    if [[ ${SCRIPT[$task]} == main_pretrain.py ]]; then produced="output/$JOB/$task/checkpoint-last.pth"
    elif [[ -n $produced ]]; then CHAINED[$task]=$produced; fi
done

task_extra() {  # the extras of one task: the common ones, then its TASK:key=value overrides
    local task=$1 i
    extra=("${EXTRA[@]}")
    for i in "${!TASK_OF[@]}"; do [[ ${TASK_OF[i]} == "$task" ]] && extra+=("${TASK_ARG[i]}"); done
    return 0
}

command_of() {  # sets args (the entry script's arguments) and cmd (how to launch it) for one task
    local task=$1 script=${SCRIPT[$1]} chained=${CHAINED[$1]:-} t
    task_extra "$task"
    for t in "${extra[@]}"; do [[ $t == --finetune || $t == --finetune=* ]] && chained=""; done
    args=(--config "${CONFIG[$task]}" --model "$(model_name "$task")" --output_dir "output/$JOB/$task")
    if [[ $script == main_pretrain.py ]]; then
        args+=(--auto_resume); [[ -n $CKPT ]] && args+=(--resume "$CKPT")
    elif [[ -n $chained ]]; then  # written by the chain's pretraining: checked once it exists, not up front
        pending=""
        if [[ -f $chained || ${checking:-0} == 0 ]]; then args+=(--finetune "$chained"); else pending=$chained; fi
    else
        [[ -n $CKPT ]] && args+=(--finetune "$CKPT")
    fi
    if [[ $NNODES -gt 1 || -n $LAUNCHER ]]; then  # submitit: one process here submits the job
        [[ -z $LAUNCHER ]] && args+=(--launcher slurm)
        args+=(--nodes "$NNODES" --ngpus "$NGPUS" "${extra[@]}")  # the extras may override these
        cmd=(python "$script" "${args[@]}")
        return
    fi
    args+=("${extra[@]}")
    if [[ $NGPUS -gt 0 ]]; then
        cmd=(torchrun --nproc_per_node="$NGPUS" --master_port="${MASTER_PORT:-29500}" "$script" "${args[@]}")
    else
        cmd=(python "$script" "${args[@]}")
    fi
}

# Pre-flight every task (recipe, flags, effective batch on this many processes, datasets, model, checkpoint:
# the scripts' --dry_run) before starting any, so that a chain does not stop at its third task after two have run.
# A --dry_run chain starts nothing and is itself that check, so it checks each task once instead of twice.
world=$(( NGPUS > 0 ? NGPUS * $NNODES : 1 ))
dry_run=0
for arg in "${EXTRA[@]}"; do [[ $arg == --dry_run || $arg == --dry_run=* ]] && dry_run=1; done
checking=1  # a checkpoint the chain writes is not there yet: the check leaves it out
for task in "${TASK_LIST[@]}"; do
    (( dry_run )) && break
    command_of "$task"
    if ! said=$(RANK=0 WORLD_SIZE=$world python "${SCRIPT[$task]}" "${args[@]}" --dry_run 2>&1); then
        # the one-line error (argparse's "error: ...", or the run's "<time> ERROR <Type>: ..."), not the usage
        printf '%s\n' "$said" | grep -E '^([^ ].*)?error: | ERROR ' >&2 || printf '%s\n' "$said" | tail -n 20 >&2
        echo "error: task '$task' does not resolve on $world process(es); nothing was started" >&2; exit 2
    fi
done

checking=$dry_run  # a dry run starts nothing, so the chain's checkpoint never appears: say where it would come from

# Each task runs under record.sh: output/JOB/TASK/records/<time>/ keeps the command line, git state, exit
# status and everything printed (all ranks, torchrun's own messages too).
for task in "${TASK_LIST[@]}"; do
    pending=""; command_of "$task"; out="output/$JOB/$task"
    [[ -n $pending ]] && echo "[run.sh] $task: --finetune $pending once the chain's pretraining has written it"
    mkdir -p "$out"
    line="[run.sh]"; printf -v quoted ' %q' "${cmd[@]}"; line+=$quoted  # shell-quoted, as record.sh does
    echo "$line" | tee -a "$out/run_sh_commands.txt"
    RECORD_DIR="$out/records/$(date +%Y%m%d_%H%M%S)_$$" bash ./record.sh "${cmd[@]}"
done
