"""The mixup paper's label-noise experiment (Zhang et al. 2018, section 3.4) on scikit-learn's digits.

One command: `python tools/label_noise.py` trains an MLP on 1,200 digits whose labels are corrupted at 20%, 50% and 80%,
with ERM, mixaug's MixUp (alpha 1 and 8), CutMix and SemiMix, and fastai's MixUp(8) as a reference, three seeds each,
and writes the clean test accuracy after every epoch to `nbs/label_noise_results.json` (shown by
`nbs/06_label_noise.ipynb`). No download: the digits ship with scikit-learn.
"""
from __future__ import annotations
import argparse, datetime, json, multiprocessing as mp, os, platform, sys, time, warnings
import numpy as np, torch, torch.nn as nn
from sklearn.datasets import load_digits
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from fastai.callback.schedule import *  # `fit_one_cycle`
import fastai.callback.mixup as fmix
from mixaug.callbacks import MixUp, CutMix

warnings.filterwarnings('ignore')
N_TRAIN = 1200

def noisy_digits(noise:float, seed:int, n_train:int=N_TRAIN):
    "Digits `(x, y)` as (n,1,8,8) in [0,1]: `n_train` training digits of which exactly `noise` have a wrong label, the clean rest for testing"
    X,y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(X))  # a new split for each seed
    X,y = torch.tensor(X[order], dtype=torch.float32).view(-1,1,8,8)/16,torch.tensor(y[order])
    clean = y[:n_train]
    flip = torch.tensor(rng.choice(n_train, round(noise*n_train), replace=False), dtype=torch.long)
    noisy = clean.clone()
    noisy[flip] = (clean[flip] + torch.tensor(rng.integers(1, 10, len(flip)))) % 10  # symmetric: any other class, uniformly
    return (X[:n_train],noisy),(X[n_train:],y[n_train:]),clean

class TensorDL(DataLoader):
    "Batches indexed straight out of tensors in memory (no per-item collation)"
    def __init__(self, *tensors, **kwargs): self.tensors = tensors; super().__init__(range(len(tensors[0])), **kwargs)
    def create_batch(self, b): i = torch.tensor(b); return tuple(t[i] for t in self.tensors)

def mlp() -> nn.Module:
    "The MLP 64-512-512-10 of the effect anchor; it takes digits as (n,1,8,8), so CutMix can cut them"
    return nn.Sequential(nn.Flatten(), nn.Linear(64,512), nn.ReLU(), nn.Linear(512,512), nn.ReLU(), nn.Linear(512,10))

def semimix(alpha):
    from mixaug.semimix import SemiMix  # written alongside this experiment; the row is 'not run' without it
    return SemiMix(unlabeled=None, alpha=alpha)

METHODS = {
    'ERM': lambda: None,
    'MixUp(1)': lambda: MixUp(alpha=1.),
    'MixUp(8)': lambda: MixUp(alpha=8.),
    'CutMix(1)': lambda: CutMix(alpha=1.),
    'SemiMix(1)': lambda: semimix(1.),
    'fastai MixUp(8)': lambda: fmix.MixUp(alpha=8.),
}

def run(method:str, noise:float, seed:int, epochs:int=60, lr:float=3e-3, bs:int=64) -> dict:
    "Train with `method`; return the clean test accuracy after each epoch and what the net fits of the wrong labels"
    torch.set_num_threads(1)
    (xt,yt),test,clean = noisy_digits(noise, seed)
    set_seed(seed, reproducible=True)
    dls = DataLoaders(TensorDL(xt, yt, bs=bs, shuffle=True, drop_last=True), TensorDL(*test, bs=1024))
    learn = Learner(dls, mlp(), loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=METHODS[method]())
    if hasattr(learn, 'progress'): learn.remove_cb(learn.progress)
    start = time.perf_counter()
    with learn.no_logging(): learn.fit_one_cycle(epochs, lr)
    with torch.no_grad(): pred = learn.model.eval()(xt).argmax(1)
    wrong = yt!=clean
    return dict(method=method, noise=noise, seed=seed, test_acc=[float(v[2]) for v in learn.recorder.values],
                fits_wrong=float((pred[wrong]==yt[wrong]).float().mean()) if wrong.any() else float('nan'),
                train_acc_clean=float((pred==clean).float().mean()), seconds=time.perf_counter()-start)

def _run(args): return run(*args)

def grid(methods, noises, seeds, epochs=60, workers=3, log=print):
    "Every (method, noise, seed), in `workers` processes; rows of `run`"
    jobs = [(m,n,s,epochs) for n in noises for m in methods for s in seeds]
    rows = []
    with mp.get_context('fork').Pool(workers) as pool:
        for r in pool.imap_unordered(_run, jobs):
            rows.append(r)
            log(f"{len(rows)}/{len(jobs)} {r['method']} noise={r['noise']} seed={r['seed']}: last {r['test_acc'][-1]:.3f} "
                f"best {max(r['test_acc']):.3f} ({r['seconds']:.0f} s)")
    return rows

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--noises', default='0.2,0.5,0.8')
    p.add_argument('--seeds', type=int, default=3)
    p.add_argument('--epochs', type=int, default=60)
    p.add_argument('--workers', type=int, default=3)
    p.add_argument('--methods', default=','.join(METHODS))
    p.add_argument('--out', default=os.path.join(os.path.dirname(__file__), '..', 'nbs', 'label_noise_results.json'))
    a = p.parse_args(argv)
    methods = a.methods.split(',')
    not_run = {}  # every method runs (kept in the results' schema)
    start = time.time()
    rows = grid(methods, [float(n) for n in a.noises.split(',')], list(range(a.seeds)), a.epochs, a.workers)
    import fastai, mixaug, hashlib
    src = {f:hashlib.sha1(open(os.path.join(os.path.dirname(mixaug.__file__), f), 'rb').read()).hexdigest()[:10]
           for f in ['core.py','callbacks.py','semimix.py'] if os.path.exists(os.path.join(os.path.dirname(mixaug.__file__), f))}
    meta = dict(mixaug_source_sha1=src, date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
                command=' '.join(['python tools/label_noise.py']+(argv if argv is not None else sys.argv[1:])),
                torch=torch.__version__, fastai=fastai.__version__, mixaug=mixaug.__version__, python=platform.python_version(),
                seconds=time.time()-start, epochs=a.epochs, lr=3e-3, bs=64, n_train=N_TRAIN, not_run=not_run)
    with open(a.out, 'w') as f: json.dump(dict(meta=meta, rows=rows), f)
    print('wrote', os.path.abspath(a.out))

if __name__ == '__main__': main()
