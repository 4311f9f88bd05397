"""Write one split of the generated shapes dataset in COCO layout (see :mod:`mmgroupmamba.det.shapes_coco`)."""
import argparse
import os.path as osp

from mmgroupmamba.det.shapes_coco import generate_shapes_coco


def main():
    parser = argparse.ArgumentParser(description='Write one split of the generated shapes dataset in COCO layout.')
    parser.add_argument('out_dir')
    parser.add_argument('--split', default='train', help='names OUT_DIR/<split>/ and instances_<split>.json')
    parser.add_argument('--num-images', type=int, default=512)
    parser.add_argument('--image-size', type=int, default=128)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--aspect-ratios', type=float, nargs='+', default=[1.0],
                        help='width / height ratios, one drawn per image (e.g. 1.333 1.5 1 0.75, like COCO)')
    args = parser.parse_args()
    ann_file = osp.join(args.out_dir, 'annotations', f'instances_{args.split}.json')
    generate_shapes_coco(ann_file, osp.join(args.out_dir, args.split), args.num_images, args.image_size,
                         seed=args.seed, aspect_ratios=args.aspect_ratios)
    print(f'wrote {args.num_images} images to {osp.join(args.out_dir, args.split)} and {ann_file}')


if __name__ == '__main__':
    main()
