#!/usr/bin/env bash
# End-to-end training on a GPU through stock `mim train`, with the real GroupMamba-T configs; only the data
# (the generated demo sets), the iteration counts and the unavailable ImageNet checkpoint are overridden.
#
#   bash benchmarks/gpu_e2e.sh OUT_DIR STEP [STEP ...]     (after tools/gpu_env.sh; PYTHONPATH set)
#
# The UperNet schedule (1500 warm-up iterations, then poly decay to 160k) is scaled to SEG_ITERS: a tenth
# warm-up, then the decay; left as is, the learning rate would stay near zero for the whole short run.
# Steps: det (Mask R-CNN 1x, GroupMamba-T, one GPU), det_graph (its CUDA-graph variant,
# mask_rcnn_groupmamba_t_cuda_graph.py: training batches padded to 800x1344, 1344x800 or 1344x1344), swin (mmdet's own Swin-T Mask R-CNN config, same data
# and overrides, AMP), det_compile and swin_compile (the two with only their backbones compiled, the same way:
# GroupMamba's model.backbone.compile=True, Swin-T through benchmarks/configs/mask_rcnn_swin_t_compiled_backbone.py's
# CompileBackboneHook), seg (UperNet 160k, GroupMamba-T), ddp (the det run on 2 GPUs with --launcher pytorch;
# compare it with det), ddp_graph (the same with the CUDA-graph config), ddp_compile (the ddp run with the
# backbone compiled: --cfg-options model.backbone.compile=True), det_compile_graphs and swin_compile_graphs
# (det_compile and swin_compile in torch.compile's mode='reduce-overhead', benchmarks/configs/), det_compile_fixed and
# swin_compile_fixed (training batches padded to seven sizes, each compiled for: benchmarks/configs/). Each run's log and a
# summary table (benchmarks/summarize_logs.py) go to OUT_DIR.
# Sizes: DET_IMAGES training images (default 300; one epoch at 2 images per GPU), SEG_ITERS (default 200);
# STEP_TIMEOUT (seconds, default none) stops a run that takes longer, keeping its log. DET_VALIDATE=0 leaves out
# the det runs' validation (train_cfg.val_begin=2 of one epoch: a compiled backbone would compile its
# inference graph there too), for training-time comparisons that must fit a call.
set -uo pipefail
out=$1; shift
mkdir -p "$out"
work=${WORK:-/tmp/e2e}
det_iters_epochs=1   # DET_IMAGES at 2 per GPU: 150 iterations on one GPU by default
det_images=${DET_IMAGES:-300}
# Named for its sizes and count: a cached set of other images is not reused.
det_data=$work/data/shapes_coco_mixed_sizes_$det_images
seg_data=$work/data/ade_demo
# Images of COCO's usual shapes (640x480, 640x427, 640x640, portrait), at half size: resized for Mask R-CNN to
# 1067x800, 1200x800, 800x800 and portrait, so batches come in several padded sizes, as on COCO.
det_sizes="--image-size 320 --aspect-ratios 1.333 1.5 1 0.75 0.667"
seg_iters=${SEG_ITERS:-200}
seg_warmup=$(( seg_iters >= 20 ? seg_iters / 10 : 1 ))
step_timeout=${STEP_TIMEOUT:-0}
# Every run logs each 10 iterations the mean time of those 10: the configs' window of 50 made each logged time a
# mean over the last 50, so in a 60-iteration compiled run the minutes of the first iterations' compile stayed in
# every logged time (thirty-fourth session: median 5.0 s/iter logged, 0.11 measured).
log_options="default_hooks.logger.interval=10 log_processor.window_size=10"
# Dynamo says when it compiles a graph again (a new size that broke a guard, a grad-mode change), so the compiled
# runs' logs show whether one compile served every batch size; run() passes those lines on as they come.
export TORCH_LOGS=${TORCH_LOGS:-recompiles}
mmdet_cfgs=$(python3 -c "import mmdet, os; print(os.path.join(os.path.dirname(mmdet.__file__), '.mim', 'configs'))")

det_data_options() {
  local opts=(model.backbone.init_cfg=None train_cfg.max_epochs=$det_iters_epochs train_cfg.val_interval=1
              train_cfg.val_begin=$(( ${DET_VALIDATE:-1} ? 1 : 2 ))
              $log_options default_hooks.checkpoint.interval=1)
  for split in train val test; do
    local file=train; [ $split = train ] || file=val
    opts+=("${split}_dataloader.dataset.data_root=$det_data/"
           "${split}_dataloader.dataset.ann_file=annotations/instances_$file.json"
           "${split}_dataloader.dataset.data_prefix.img=$file/"
           "${split}_dataloader.dataset.metainfo.classes=(rectangle,ellipse,triangle)")
  done
  # The demo has 3 classes: heads left at COCO's 80 predict labels the evaluator cannot map (IndexError).
  opts+=(model.roi_head.bbox_head.num_classes=3 model.roi_head.mask_head.num_classes=3)
  opts+=("val_evaluator.ann_file=$det_data/annotations/instances_val.json"
         "test_evaluator.ann_file=$det_data/annotations/instances_val.json")
  printf '%s\n' "${opts[@]}"
}

run() {  # name, then the mim command
  local name=$1; shift
  local start=$(date +%s)
  # The whole log to OUT_DIR; its progress lines (mmengine's iteration logs, recompiles, errors) also to stdout as
  # they come, so that a caller's own timeout, cutting this script short, still has them.
  timeout "$step_timeout" "$@" 2>&1 | tee "$out/$name.log" |
    grep --line-buffered -E "Iter\(train\)|[Rr]ecompil|Error|Traceback"
  local rc=${PIPESTATUS[0]}
  echo "$name: rc=$rc in $(( $(date +%s) - start ))s"
  [ $rc = 0 ] || tail -25 "$out/$name.log"
}

make_det_data() {
  [ -f "$det_data/annotations/instances_val.json" ] && return
  mkdir -p "$work"
  # From $work: run from the repo root, python -m would import the source folder, which lacks the kernels.
  (cd "$work" &&
   python3 -m mmgroupmamba.det.demo_data "$det_data" --split train --num-images "$det_images" $det_sizes --seed 0 &&
   python3 -m mmgroupmamba.det.demo_data "$det_data" --split val --num-images 40 $det_sizes --seed 1
  ) > "$out/make_det_data.log" 2>&1 || { tail -20 "$out/make_det_data.log"; exit 1; }
}

summaries=()
det_run() {  # name, config, then mim options; runs on the first GPU unless --launcher pytorch asks for more
  local name=$1 config=$2; shift 2
  make_det_data
  mapfile -t opts < <(det_data_options)
  local gpus=(env CUDA_VISIBLE_DEVICES=0)
  [[ " $* " == *" --launcher pytorch "* ]] && gpus=()
  run "$name" "${gpus[@]}" python3 -m mim train mmdet "$config" --work-dir "$work/$name" "$@" --cfg-options "${opts[@]}"
  summaries+=("$work/$name")
}

for step in "$@"; do
  case $step in
    det) det_run det_groupmamba_t configs/mmdet/mask_rcnn_groupmamba_t.py;;
    det_graph) det_run det_groupmamba_t_graphs configs/mmdet/mask_rcnn_groupmamba_t_cuda_graph.py;;
    swin) det_run det_swin_t "$mmdet_cfgs/swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py" --amp;;
    # Both backbones through the same CompiledForward (dynamic sizes): GroupMamba's own option, Swin-T's hook.
    det_compile) det_run det_groupmamba_t_compiled configs/mmdet/mask_rcnn_groupmamba_t.py \
      --cfg-options model.backbone.compile=True;;
    swin_compile) det_run det_swin_t_compiled benchmarks/configs/mask_rcnn_swin_t_compiled_backbone.py --amp;;
    # The two with training batches padded to seven fixed sizes and compiled for each (dynamic=False): mmdet's
    # Swin-T did not get through its first step with dynamic sizes (README, thirty-fourth session).
    det_compile_fixed) det_run det_groupmamba_t_compiled_fixed \
      benchmarks/configs/mask_rcnn_groupmamba_t_compiled_fixed_sizes.py;;
    swin_compile_fixed) det_run det_swin_t_compiled_fixed \
      benchmarks/configs/mask_rcnn_swin_t_compiled_fixed_sizes.py --amp;;
    # The same two with torch.compile's mode='reduce-overhead' (CUDA graphs recorded per batch size).
    det_compile_graphs) det_run det_groupmamba_t_compiled_graphs \
      benchmarks/configs/mask_rcnn_groupmamba_t_compiled_graphs.py;;
    swin_compile_graphs) det_run det_swin_t_compiled_graphs \
      benchmarks/configs/mask_rcnn_swin_t_compiled_graphs_backbone.py --amp;;
    seg)
      [ -d "$seg_data" ] || (mkdir -p "$work" && cd "$work" &&  # not from the repo root: see make_det_data
        python3 -m mmgroupmamba.seg.demo_data --out "$seg_data" --num-train 200 --num-val 20)
      run seg_groupmamba_t env CUDA_VISIBLE_DEVICES=0 python3 -m mim train mmseg configs/mmseg/upernet_groupmamba-t_8xb2-160k_ade20k-512x512.py \
        --work-dir "$work/seg_groupmamba_t" --cfg-options model.backbone.init_cfg=None \
        train_dataloader.dataset.data_root="$seg_data" val_dataloader.dataset.data_root="$seg_data" \
        test_dataloader.dataset.data_root="$seg_data" train_cfg.max_iters=$seg_iters train_cfg.val_interval=$seg_iters \
        default_hooks.checkpoint.interval=$seg_iters $log_options \
        param_scheduler.0.end=$seg_warmup param_scheduler.1.begin=$seg_warmup param_scheduler.1.end=$seg_iters
      summaries+=("$work/seg_groupmamba_t");;
    ddp) det_run ddp_2gpu configs/mmdet/mask_rcnn_groupmamba_t.py --launcher pytorch --gpus 2;;
    ddp_graph) det_run ddp_2gpu_graphs configs/mmdet/mask_rcnn_groupmamba_t_cuda_graph.py --launcher pytorch --gpus 2;;
    # mim passes both --cfg-options to tools/train.py, whose DictAction merges them.
    ddp_compile) det_run ddp_2gpu_compiled configs/mmdet/mask_rcnn_groupmamba_t.py --launcher pytorch --gpus 2 \
      --cfg-options model.backbone.compile=True;;
    *) echo "unknown step $step"; exit 2;;
  esac
done
python3 benchmarks/summarize_logs.py "${summaries[@]}" | tee "$out/summary.md"
