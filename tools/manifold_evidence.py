"""Manifold Mixup against MixUp and ERM on data that ship with scikit-learn: digits (an MLP and a small CNN, clean and
50% wrong labels, the label-noise page's protocol) and breast_cancer through `tabular_learner`.

One command: `python tools/manifold_evidence.py` trains each model with ERM, `MixUp(alpha=2)` and
`ManifoldMixup(alpha=2)`, 3 paired seeds: for a seed, every method gets the same split (and corruption), the same
initial weights and the same batches (each callback draws from a generator of its own). Digits: `tools/label_noise.py`'s
split, 1,000 training and 200 validation digits with the same share of wrong labels, 597 clean test digits, 60 epochs.
breast_cancer: 298 training, 100 validation and 171 test rows (stratified), 20 epochs. After every epoch it measures
the accuracy and loss on validation, the accuracy on test and, on digits, how many wrong training labels the net
reproduces; the epoch is chosen on validation only. Results, with their summary, the git commit, the hash of every
source file that ran and each run's wall time, go to `nbs/manifold_evidence_results.json`, read by
`nbs/08_manifold_evidence.ipynb`. No download.
"""
from __future__ import annotations
import argparse, datetime, json, multiprocessing as mp, os, platform, sys, time, warnings
import numpy as np, pandas as pd, torch, torch.nn as nn
from sklearn.datasets import load_breast_cancer
from fastai.callback.schedule import *  # `fit_one_cycle`
from fastai.tabular.all import TabularPandas, Categorify, Normalize, tabular_learner, CategoryBlock
from fastai.torch_core import set_seed
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mask_family import (sha, Measure, stratified_split, mean_sd, paired, select_epoch, test_picked, git_state, engine_match,
                         loaded_sources)
from label_noise import noisy_splits, mlp, train
from mixaug.callbacks import MixUp
from mixaug.manifold import ManifoldMixup

warnings.filterwarnings('ignore')
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

def cnn() -> nn.Module:
    "A small CNN for 8x8 digits: two convolutions, then a linear layer"
    return nn.Sequential(nn.Conv2d(1,32,3,padding=1), nn.ReLU(), nn.Conv2d(32,64,3,stride=2,padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(64*4*4,10))

# Where ManifoldMixup mixes: the input and the output of each hidden block (the paper's k = 0, 1, 2)
MODELS = {'MLP': (mlp, ['input','2','4']), 'CNN': (cnn, ['input','1','3'])}
ALPHA = 2.
METHODS = {'ERM': lambda mods, seed: None,
           'MixUp(2)': lambda mods, seed: MixUp(alpha=ALPHA, seed=seed),
           'ManifoldMixup(2)': lambda mods, seed: ManifoldMixup(alpha=ALPHA, modules=mods, seed=seed)}
N_VAL_CANCER,N_TEST_CANCER = 100,171

def run_digits(model:str, method:str, noise:float, seed:int, epochs:int=60, lr:float=3e-3, bs:int=64) -> dict:
    "Train `model` with `method` on digits with `noise` wrong labels; per-epoch validation, test and memorisation numbers, the epoch chosen on validation"
    start = time.perf_counter()
    torch.set_num_threads(1)
    make,mods = MODELS[model]
    r = train(make, [METHODS[method](mods, seed)], noisy_splits(noise, seed), seed, epochs, lr, bs)
    return dict(task='digits', model=model, method=method, noise=noise, seed=seed, **r, seconds=time.perf_counter()-start)

def cancer_table(seed:int, n_bins:int=4):
    "breast_cancer as a table: the 30 measurements, 3 of them also as quantile codes (categorical), a stratified train / validation / test split per seed"
    d = load_breast_cancer(as_frame=True)
    df = d.frame.rename(columns=lambda c: c.replace(' ','_'))
    cont = [c for c in df.columns if c!='target']
    cats = []
    for c in cont[:3]:
        df[c+'_q'] = pd.qcut(df[c], n_bins, labels=False).astype(str); cats.append(c+'_q')
    return df,cats,cont,[list(map(int, i)) for i in stratified_split(df.target.values, N_VAL_CANCER, N_TEST_CANCER, seed)]

def tab_tensors(dl) -> tuple:
    "All of a tabular loader's batches as one (cats, conts, y)"
    bs = list(dl)
    return tuple(torch.cat([b[i] for b in bs]) for i in range(3))

class TabMeasure(Measure):
    "`Measure` for a `TabularModel`: its inputs are (cats, conts)"
    def after_epoch(self):
        for (xc,xn,y),k in ((self.valid,'val'),(self.test,'test')):
            was = self.model.training
            self.model.eval()
            try:
                with torch.no_grad(): out = self.model(xc, xn)
            finally: self.model.train(was)
            y = y.view(-1).long()
            getattr(self, f'{k}_acc').append(float((out.argmax(1)==y).double().mean()))
            getattr(self, f'{k}_loss').append(float(nn.functional.cross_entropy(out.double(), y)))

def run_tabular(method:str, seed:int, epochs:int=20, lr:float=1e-2, bs:int=64) -> dict:
    "`tabular_learner` on breast_cancer with `method`; per-epoch validation and test numbers, the epoch chosen on validation"
    start = time.perf_counter()
    torch.set_num_threads(1)
    df,cats,cont,(tr,va,te) = cancer_table(seed)
    to = TabularPandas(df, [Categorify, Normalize], cat_names=cats, cont_names=cont, y_names='target', y_block=CategoryBlock(), splits=[tr,va])
    set_seed(seed, reproducible=True)
    dls = to.dataloaders(bs=bs, num_workers=0)
    valid,test = tab_tensors(dls.valid),tab_tensors(dls.test_dl(df.iloc[te], with_labels=True))
    cb = METHODS[method](None, seed)  # ManifoldMixup's default places for a TabularModel
    m = TabMeasure(valid, test)
    learn = tabular_learner(dls, layers=[64,32], cbs=[m]+([cb] if cb is not None else []))
    init = sha(*learn.model.state_dict().values())
    if hasattr(learn, 'progress'): learn.remove_cb(learn.progress)
    with learn.no_logging(): learn.fit_one_cycle(epochs, lr)
    e = select_epoch(m.val_acc, m.val_loss)
    return dict(task='cancer', model='TabularModel', method=method, noise=0., seed=seed, val_acc=m.val_acc, val_loss=m.val_loss,
                test_acc=m.test_acc, test_loss=m.test_loss, selected_epoch=e, selected_test_acc=m.test_acc[e], last_test_acc=m.test_acc[-1],
                n_train=len(tr), n_val=len(va), n_test=len(te), split_sha=sha(torch.tensor(tr), torch.tensor(va), torch.tensor(te), *test),
                init_sha=init, batches_sha=m.h.hexdigest()[:12], seconds=time.perf_counter()-start)

def _run(job): return run_tabular(*job[1:]) if job[0]=='cancer' else run_digits(*job[1:])

def group(r) -> str: return f"{r['model']} noise {r['noise']:g}" if r['task']=='digits' else 'cancer'

def summarise(rows:list) -> dict:
    "For each (model, noise) and method: test accuracy (chosen epoch; last) and wrong labels reproduced, mean ± sd, and the paired differences Manifold − MixUp, Manifold − ERM, MixUp − ERM"
    out = {}
    pairs = {'manifold_minus_mixup': ('ManifoldMixup(2)','MixUp(2)'), 'manifold_minus_erm': ('ManifoldMixup(2)','ERM'), 'mixup_minus_erm': ('MixUp(2)','ERM')}
    for g in dict.fromkeys(map(group, rows)):
        rs = [r for r in rows if group(r)==g]
        keys = [k for k in ('selected_test_acc','last_test_acc','selected_fits_wrong','last_fits_wrong') if k in rs[0] and not np.isnan(rs[0][k])]
        by = {k: {m: {r['seed']: r[k] for r in rs if r['method']==m} for m in METHODS} for k in keys}
        out[g] = {k: {m: mean_sd([v[s] for s in sorted(v)]) for m,v in by[k].items()} | {p: paired(by[k][a], by[k][b]) for p,(a,b) in pairs.items()}
                  for k in keys}
        out[g]['test_picked'] = test_picked([dict(r, dataset=g) for r in rs])[g]
    return out

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--seeds', type=int, default=3)
    p.add_argument('--epochs', type=int, default=60, help='digits; breast_cancer trains a third of them')
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--out', default=os.path.join(ROOT, 'nbs', 'manifold_evidence_results.json'))
    a = p.parse_args(argv)
    seeds = list(range(a.seeds))
    start = time.time()
    git = git_state() | engine_match()
    jobs = [('digits',m,k,n,s,a.epochs) for m in MODELS for n in [0., .5] for s in seeds for k in METHODS]
    jobs += [('cancer',k,s,a.epochs//3) for s in seeds for k in METHODS]
    rows = []
    with mp.get_context('fork').Pool(a.workers) as pool:
        for r in pool.imap_unordered(_run, jobs):
            rows.append(r)
            print(f"{len(rows)}/{len(jobs)} {r['task']} {r['model']} {r['method']} noise={r['noise']} seed={r['seed']}: test "
                  f"{r['selected_test_acc']:.3f} at epoch {r['selected_epoch']+1} (chosen on validation), {r['last_test_acc']:.3f} last "
                  f"({r['seconds']:.0f} s)", flush=True)
    key = {(j[0],)+tuple(j[1:5] if j[0]=='digits' else ('TabularModel',j[1],0.,j[2])):i for i,j in enumerate(jobs)}
    rows.sort(key=lambda r: key[(r['task'],r['model'],r['method'],r['noise'],r['seed'])])
    import fastai, mixaug, sklearn
    meta = dict(command=' '.join(['python tools/manifold_evidence.py']+(argv if argv is not None else sys.argv[1:])),
                date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'), git=git, git_after=git_state() | engine_match(),
                sources=loaded_sources(), seconds=time.time()-start, run_seconds=sum(r['seconds'] for r in rows), workers=a.workers,
                threads_per_process=1, torch=torch.__version__, fastai=fastai.__version__, mixaug=mixaug.__version__, sklearn=sklearn.__version__,
                python=platform.python_version(), epochs=a.epochs, epochs_cancer=a.epochs//3, alpha=ALPHA, seeds=seeds, methods=list(METHODS),
                lr=3e-3, lr_cancer=1e-2, bs=64, optimiser='Adam, fit_one_cycle', places={m:v[1] for m,v in MODELS.items()},
                n_val_cancer=N_VAL_CANCER, n_test_cancer=N_TEST_CANCER, smoke=a.epochs!=60 or a.seeds!=3)
    with open(a.out, 'w') as f: json.dump(dict(meta=meta, summary=summarise(rows), rows=rows), f, indent=1)
    print('wrote', os.path.abspath(a.out), f"in {meta['seconds']:.0f} s")

if __name__ == '__main__': main()
