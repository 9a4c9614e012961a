"""Test worker for the Lightning section of `07_distributed.ipynb` (not a notebook: nbdev neither tests nor documents it).

Launched by the notebook as `torchrun --nproc_per_node 2 _lightning_ddp_worker.py OUT DEADLINE`: every process runs
tiny `pl.Trainer(strategy='ddp', accelerator='cpu', devices=2)` fits (Lightning joins the gloo process group on
loopback from torchrun's environment and shards the data with its `DistributedSampler`), with mixaug's Lightning
callbacks, pickles what it saw in each training step to `OUT/rank{rank}.pkl`, and ends itself after `DEADLINE` seconds
whatever happens.
"""
import os, sys, pickle, threading, logging, warnings
from pathlib import Path
import torch, torch.nn as nn, torch.distributed as dist
import pytorch_lightning as pl
from mixaug.lightning import MixUp, CutMix, CutMixUp

# Every sample carries its identity: sample `g` is 1 in channel `g` and 0 elsewhere (4x4 pixels, so CutMix cuts boxes)
N,K,BS = 24,4,4
X = torch.eye(N).view(N,N,1,1).expand(N,N,4,4).contiguous()
Y = torch.arange(N) % K

def shares(x): return x.float().mean((2,3))

class Net(pl.LightningModule):
    "Records, for each training step, the sample ids of the batch given, what the callback drew and what the step got"
    def __init__(self, cb):
        super().__init__()
        self.net,self.loss_func,self.cb,self.log_ = nn.Sequential(nn.Flatten(), nn.Linear(N*16, K)),nn.CrossEntropyLoss(),cb,[]
    def on_train_batch_start(self, batch, i): self.log_.append(dict(ids=shares(batch[0]).argmax(1).tolist()))
    def training_step(self, b, i):
        m = self.cb.mix
        self.log_[-1].update(shares=shares(b[0]), lam=None if m is None else m.lam.clone(), idx=None if m is None else m.idx.clone(),
                             model=type(self.trainer.strategy.model).__name__, swapped=self.loss_func is not self._lf)
        return self.loss_func(self.net(b[0]), b[1])
    def configure_optimizers(self): return torch.optim.SGD(self.parameters(), 1e-2)

def run(make_cb, fresh_torch_seed=False):
    "Fit a new module with callback `make_cb()` under Lightning's DDP; return what was seen"
    pl.seed_everything(0, verbose=False)  # same model init on every rank
    if fresh_torch_seed: torch.seed()  # torch seeded from the OS, different in each process
    cb = make_cb()
    m = Net(cb); m._lf = m.loss_func
    dl = torch.utils.data.DataLoader(list(zip(X, Y)), batch_size=BS)
    t = pl.Trainer(strategy='ddp', accelerator='cpu', devices=2, max_epochs=2, callbacks=[cb], logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    t.fit(m, dl)
    return dict(log=m.log_, loss_is_users=m.loss_func is m._lf, step_is_own='training_step' not in m.__dict__,
                weights=torch.cat([p.detach().flatten() for p in m.parameters()]))

def scenarios():
    return dict(mixup=(MixUp,{}), cutmix=(CutMix,{}), cutmixup=(lambda: CutMixUp(per_sample=True),{}),
                same=(lambda: MixUp(same_on_all_ranks=True),dict(fresh_torch_seed=True)),
                seed1_a=(lambda: MixUp(seed=1),{}), seed1_b=(lambda: MixUp(seed=1),dict(fresh_torch_seed=True)))

if __name__=='__main__':
    out = Path(sys.argv[1])
    watchdog = threading.Timer(float(sys.argv[2]) if len(sys.argv)>2 else 600., lambda: os._exit(3))
    watchdog.daemon = True; watchdog.start()
    for n in ('pytorch_lightning', 'lightning_fabric'): logging.getLogger(n).setLevel(logging.ERROR)
    warnings.filterwarnings('ignore')
    res = {}
    for name,(make_cb,kw) in scenarios().items():
        try: res[name] = run(make_cb, **kw)
        except Exception as e: res[name] = dict(error=f"{type(e).__name__}: {e}")
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get('RANK', 0))
    (out/f'rank{rank}.pkl').write_bytes(pickle.dumps(res))
    if dist.is_initialized(): dist.barrier(); dist.destroy_process_group()
