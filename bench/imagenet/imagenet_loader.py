"""The input pipeline that dataloader_throughput.py times and
ort_dataloader_eval.py feeds to ONNX Runtime, in one place so that both
measure the same thing: torchvision's standard ImageNet evaluation
transforms (Resize(256), CenterCrop(224), ToTensor, Normalize with
ImageNet's mean and std) over ImageFolder, batched by a DataLoader.
"""

import torch
from torchvision import datasets, transforms

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def add_arguments(parser):
    parser.add_argument("folder", help="an ImageFolder tree: FOLDER/<class>/<image>")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--limit", type=int, help="only the first N images (in ImageFolder's sorted order)")


def data_loader(args):
    transform = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                    transforms.Normalize(MEAN, STD)])
    dataset = datasets.ImageFolder(args.folder, transform=transform)
    if args.limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(args.limit, len(dataset))))
    return torch.utils.data.DataLoader(dataset, batch_size=args.batch, num_workers=args.workers)
