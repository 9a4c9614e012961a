"""Manifold Mixup against MixUp and ERM on data that ships with scikit-learn: digits (an MLP and a small CNN, clean and
50% wrong labels, the label-noise page's protocol) and breast_cancer through `tabular_learner`.

One command: `python tools/manifold_evidence.py` writes `nbs/manifold_evidence_results.json`, read by
`nbs/08_manifold_evidence.ipynb`. No download.
"""
from __future__ import annotations
import argparse, datetime, json, multiprocessing as mp, os, platform, sys, time, warnings
import numpy as np, pandas as pd, torch, torch.nn as nn
from sklearn.datasets import load_breast_cancer
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from fastai.callback.schedule import *  # `fit_one_cycle`
from fastai.tabular.all import TabularPandas, Categorify, Normalize, tabular_learner, CategoryBlock
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from label_noise import noisy_digits, TensorDL, mlp
from mixaug.callbacks import MixUp
from mixaug.manifold import ManifoldMixup

warnings.filterwarnings('ignore')

def cnn() -> nn.Module:
    "A small CNN for 8x8 digits: two convolutions, then a linear layer"
    return nn.Sequential(nn.Conv2d(1,32,3,padding=1), nn.ReLU(), nn.Conv2d(32,64,3,stride=2,padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(64*4*4,10))

# Where ManifoldMixup mixes: the input and the output of each hidden block (the paper's k = 0, 1, 2)
MODELS = {'MLP': (mlp, ['input','2','4']), 'CNN': (cnn, ['input','1','3'])}
ALPHA = 2.
METHODS = {'ERM': lambda mods: None,
           'MixUp(2)': lambda mods: MixUp(alpha=ALPHA),
           'ManifoldMixup(2)': lambda mods: ManifoldMixup(alpha=ALPHA, modules=mods)}

def run_digits(model:str, method:str, noise:float, seed:int, epochs:int=60, lr:float=3e-3, bs:int=64) -> dict:
    "Train `model` with `method` on digits with `noise` wrong labels; clean test accuracy after each epoch, and memorisation"
    torch.set_num_threads(1)
    (xt,yt),test,clean = noisy_digits(noise, seed)
    set_seed(seed, reproducible=True)
    make,mods = MODELS[model]
    dls = DataLoaders(TensorDL(xt, yt, bs=bs, shuffle=True, drop_last=True), TensorDL(*test, bs=1024))
    learn = Learner(dls, make(), loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=METHODS[method](mods))
    if hasattr(learn, 'progress'): learn.remove_cb(learn.progress)
    start = time.perf_counter()
    with learn.no_logging(): learn.fit_one_cycle(epochs, lr)
    with torch.no_grad(): pred = learn.model.eval()(xt).argmax(1)
    wrong = yt!=clean
    return dict(task='digits', model=model, method=method, noise=noise, seed=seed, test_acc=[float(v[2]) for v in learn.recorder.values],
                fits_wrong=float((pred[wrong]==yt[wrong]).float().mean()) if wrong.any() else float('nan'), seconds=time.perf_counter()-start)

def cancer_table(seed:int, n_bins:int=4):
    "breast_cancer as a table: the 30 measurements, 3 of them also as quantile codes (categorical), a new 70/30 split per seed"
    d = load_breast_cancer(as_frame=True)
    df = d.frame.rename(columns=lambda c: c.replace(' ','_'))
    cont = [c for c in df.columns if c!='target']
    cats = []
    for c in cont[:3]:
        df[c+'_q'] = pd.qcut(df[c], n_bins, labels=False).astype(str); cats.append(c+'_q')
    idx = np.random.default_rng(seed).permutation(len(df))
    n = int(.7*len(df))
    return df,cats,cont,[list(idx[:n]), list(idx[n:])]

def run_tabular(method:str, seed:int, epochs:int=20, lr:float=1e-2, bs:int=64) -> dict:
    "`tabular_learner` on breast_cancer with `method`; test accuracy after each epoch"
    torch.set_num_threads(1)
    df,cats,cont,splits = cancer_table(seed)
    to = TabularPandas(df, [Categorify, Normalize], cat_names=cats, cont_names=cont, y_names='target', y_block=CategoryBlock(), splits=splits)
    set_seed(seed, reproducible=True)
    dls = to.dataloaders(bs=bs, num_workers=0)
    cb = METHODS[method](None)  # ManifoldMixup's default places for a TabularModel
    learn = tabular_learner(dls, layers=[64,32], metrics=accuracy, cbs=cb)
    if hasattr(learn, 'progress'): learn.remove_cb(learn.progress)
    start = time.perf_counter()
    with learn.no_logging(): learn.fit_one_cycle(epochs, lr)
    return dict(task='cancer', model='TabularModel', method=method, noise=0., seed=seed,
                test_acc=[float(v[2]) for v in learn.recorder.values], fits_wrong=float('nan'), seconds=time.perf_counter()-start)

def _run(job): return run_tabular(*job[1:]) if job[0]=='cancer' else run_digits(*job[1:])

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--seeds', type=int, default=3)
    p.add_argument('--epochs', type=int, default=60)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--out', default=os.path.join(os.path.dirname(__file__), '..', 'nbs', 'manifold_evidence_results.json'))
    a = p.parse_args(argv)
    seeds = list(range(a.seeds))
    jobs = [('digits',m,k,n,s,a.epochs) for m in MODELS for n in [0., .5] for k in METHODS for s in seeds]
    jobs += [('cancer',k,s) for k in METHODS for s in seeds]
    start,rows = time.time(),[]
    with mp.get_context('fork').Pool(a.workers) as pool:
        for r in pool.imap_unordered(_run, jobs):
            rows.append(r)
            print(f"{len(rows)}/{len(jobs)} {r['task']} {r['model']} {r['method']} noise={r['noise']} seed={r['seed']}: "
                  f"last {r['test_acc'][-1]:.3f} best {max(r['test_acc']):.3f} ({r['seconds']:.0f} s)", flush=True)
    import fastai, mixaug
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
                command=' '.join(['python tools/manifold_evidence.py']+(argv if argv is not None else sys.argv[1:])),
                torch=torch.__version__, fastai=fastai.__version__, mixaug=mixaug.__version__, python=platform.python_version(),
                seconds=time.time()-start, epochs=a.epochs, alpha=ALPHA, seeds=a.seeds, workers=a.workers,
                places={m:v[1] for m,v in MODELS.items()})
    with open(a.out, 'w') as f: json.dump(dict(meta=meta, rows=rows), f)
    print('wrote', os.path.abspath(a.out))

if __name__ == '__main__': main()
