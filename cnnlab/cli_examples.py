"""The examples that end each command's --help, and `cnnlab`'s own (data: the command line shows
them as they are)."""

EPILOGS = {
    "cnnlab": """examples:
  cnnlab presets                                       # the models, their layers and parameter counts
  cnnlab train --model pool-bn --data ~/data/cifar10/train
  cnnlab evaluate runs/pool-bn --data my-test-images/
  cnnlab transfer --model efficientnet_lite0 --data photos/
  cnnlab predict cat.jpg --model runs/transfer-efficientnet_lite0
  cnnlab export runs/pool-bn -o pool-bn.onnx
  cnnlab serve runs/transfer-efficientnet_lite0             # a page and an HTTP API on 127.0.0.1:8000
  cnnlab report runs/pool-bn runs/transfer-efficientnet_lite0 -o report.html
  cnnlab reproduce --data-root ~/data --quick           # the whole seed study in minutes

One spelling everywhere: --model names the model (a preset, a backbone, a run directory or an
.onnx file), --out DIR a folder to write into, -o/--output FILE a file to write.""",
    "train": """examples:
  cnnlab train --model pool-bn --data ../shared/data/cifar10/train
  cnnlab train --model fast --data ~/data/cifar10/train --name fast-try
  cnnlab train --model dropout --data cifar10 --epochs 30 --monitor val_accuracy --patience 5
  cnnlab train --model conv --data photos/ --val-split 0.2 --test-split 0.2 --seed 1
  cnnlab train --model pool-bn --data photos/ --labels labels.csv --class-weights balanced  # image,label[,split]
  cnnlab train --model pool-bn --data photos/ --labels labels.csv --multi-label --monitor val_map  # labels cat;dog
  cnnlab train --model pool-bn --data photos/ --image-size 64 --augment crop        # a preset adapts to 64 px
  cnnlab train --model resnet18 --data photos/ --image-size 128 --augment crop,trivial --mixup 0.2
  cnnlab train --model pool-bn --data photos/ --nproc 2          # 2 processes of this machine
  torchrun --standalone --nproc-per-node 8 -m cnnlab train --model fast --data photos/ --sync-bn
  cnnlab train --model pool-bn --data photos/ --name p1 --resume-if-exists  # a Slurm job that may be requeued""",
    "lr-find": """examples:
  cnnlab lr-find --model pool-bn --data ../shared/data/cifar10/train       # plot in runs/lr_find-pool-bn.png
  cnnlab lr-find --model efficientnet_lite0 --data photos/ -o head-lr.png
  cnnlab train --model pool-bn --data photos/ --lr auto                   # the same sweep, then the run""",
    "evaluate": """examples:
  cnnlab evaluate runs/pool-bn --data ../shared/data/cifar10/train
  cnnlab evaluate --model runs/fast --data my-test-images/ --json
  cnnlab evaluate runs/pool-bn --data photos/ --labels labels.csv    # its test rows, if it has a split column
  cnnlab evaluate runs/tags --data photos/ --labels tags.csv --threshold 0.4   # multi-label: each label at 0.4""",
    "resume": """examples:
  cnnlab resume runs/dropout
  cnnlab resume --model runs/dropout
  cnnlab train --resume runs/dropout
  torchrun --standalone --nproc-per-node 4 -m cnnlab resume runs/dropout""",
    "transfer": """examples:
  cnnlab transfer --data photos/ --model efficientnet_lite2      # the most accurate offline backbone
  cnnlab transfer --data photos/ --labels labels.tsv --sampler balanced   # labels from a file; rare classes
  cnnlab transfer --data photos/ --labels labels.csv --multi-label        # several labels per image: cat;dog
  cnnlab transfer --data ../shared/data/cats-vs-dogs --model efficientnet_lite0 --no-tta
  cnnlab transfer --data ../shared/data/cats-vs-dogs --model efficientnet_lite0 --fine-tune-epochs 2 --unfreeze 2
  cnnlab transfer --data pets/ --model vgg19 --weights vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5
  cnnlab transfer --data pets/ --model vgg19 --weights ~/vgg19-dcbb9e9d.pth --epochs 3""",
    "predict": """examples:
  cnnlab predict eagle.jpg --model efficientnet_lite0
  cnnlab predict photos/ --model vgg19 --weights vgg19-dcbb9e9d.pth --top 5
  cnnlab predict cat.png dog.png --model runs/transfer-efficientnet_lite0 --json""",
    "explain": """examples:
  cnnlab explain cat.jpg dog.jpg --model efficientnet_lite0 --out explanations/
  cnnlab explain photos/ --model runs/transfer-efficientnet_lite0 --class dog""",
    "export": """examples:
  cnnlab export runs/pool-bn
  cnnlab export --model runs/transfer-efficientnet_lite0 -o pets.onnx
  cnnlab predict cat.jpg --model pets.onnx
  cnnlab export runs/transfer-efficientnet_lite0 --int8            # RUN_DIR/model-int8.onnx, for CPUs
  cnnlab export runs/pool-bn --int8 --max-drop 0.5 -o pool-bn-int8.onnx""",
    "serve": """examples:
  cnnlab serve runs/transfer-efficientnet_lite0              # open http://127.0.0.1:8000/ and drop a photo
  cnnlab serve runs/transfer-efficientnet_lite0/model-int8.onnx --port 9000
  cnnlab serve runs/pool-bn --host 0.0.0.0 --max-upload-mb 5  # other machines too
  curl -F file=@cat.jpg -F file=@dog.jpg 'http://127.0.0.1:8000/predict?top=2'""",
    "report": """examples:
  cnnlab report runs/conv runs/pool-bn runs/dropout -o report.html
  cnnlab report runs/*/ -o all-runs.html""",
    "reproduce": """examples:
  cnnlab reproduce --data-root ../shared/data --model efficientnet_lite0
  cnnlab reproduce --data-root ../shared/data --model efficientnet_lite0 --quick
  cnnlab reproduce --model vgg19 --weights vgg19-dcbb9e9d.pth --data-root ~/data
  cnnlab reproduce          # on a connected machine: downloads CIFAR-10 and Oxford-IIIT Pet""",
    "presets": """examples:
  cnnlab presets""",
    "summary": """examples:
  cnnlab summary --model dropout
  cnnlab summary --model fast --image-size 32""",
    "study": """examples:
  cnnlab study cifar10 --data ../shared/data/cifar10/train
  cnnlab study cifar10 --data ../shared/data/cifar10/train --epochs-scale 0.1""",
}
