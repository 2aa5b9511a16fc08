//! Every adapted linear layer of a model, addressed by module path
//! (`model.layers.0.self_attn.q_proj`), and the whole-model adapter operations.
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{Tensor, Var};
use rand::SeedableRng;

use crate::config::LoraConfig;
use crate::error::{AdapterError, Result};
use crate::peft::{PeftAdapter, PeftConfig};
use crate::site::{AdapterSite, ForwardMode, FrozenAdapter, LoraAdapter};

/// Index of a site in its [`AdapterSites`]; layers keep it to call [`AdapterSites::forward`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SiteId(usize);

/// The model's linear layers in registration order, each an [`AdapterSite`].
#[derive(Debug, Clone, Default)]
pub struct AdapterSites {
    paths: Vec<String>,
    sites: Vec<AdapterSite>,
    index: HashMap<String, usize>,
    /// The hyperparameters of the current adapters, once there are any.
    lora: Option<LoraConfig>,
}

/// A seed per site from the step's seed (splitmix64), so the sites' dropout
/// masks are independent and do not depend on call order.
fn site_seed(seed: u64, site: usize) -> u64 {
    let mut z = seed
        ^ (site as u64)
            .wrapping_add(1)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl AdapterSites {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers the linear layer at `path`; paths are unique.
    pub fn insert(&mut self, path: impl Into<String>, site: AdapterSite) -> Result<SiteId> {
        let path = path.into();
        if self.index.contains_key(&path) {
            return Err(AdapterError::Site {
                site: path,
                message: "registered twice".into(),
            });
        }
        let id = self.sites.len();
        self.index.insert(path.clone(), id);
        self.paths.push(path);
        self.sites.push(site);
        Ok(SiteId(id))
    }

    pub fn len(&self) -> usize {
        self.sites.len()
    }
    pub fn is_empty(&self) -> bool {
        self.sites.is_empty()
    }
    pub fn id(&self, path: &str) -> Option<SiteId> {
        self.index.get(path).map(|&i| SiteId(i))
    }
    pub fn get(&self, path: &str) -> Option<&AdapterSite> {
        self.index.get(path).map(|&i| &self.sites[i])
    }
    pub fn get_mut(&mut self, path: &str) -> Option<&mut AdapterSite> {
        self.index.get(path).map(|&i| &mut self.sites[i])
    }
    pub fn site(&self, id: SiteId) -> &AdapterSite {
        &self.sites[id.0]
    }
    pub fn path(&self, id: SiteId) -> &str {
        &self.paths[id.0]
    }
    /// All sites with their paths, in registration order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &AdapterSite)> {
        self.paths.iter().map(String::as_str).zip(&self.sites)
    }
    /// Sites that hold a current adapter.
    pub fn adapted(&self) -> impl Iterator<Item = (&str, &AdapterSite)> {
        self.iter().filter(|(_, s)| s.current().is_some())
    }
    /// The hyperparameters of the current adapters.
    pub fn lora_config(&self) -> Option<&LoraConfig> {
        self.lora.as_ref()
    }

    /// Runs site `id` on `x`; in training with dropout the site's mask is
    /// derived from the step's seed and the site's index.
    pub fn forward(
        &self,
        id: SiteId,
        x: &Tensor,
        mode: ForwardMode,
    ) -> candle_core::Result<Tensor> {
        let mode = match mode {
            ForwardMode::Train {
                dropout_seed: Some(seed),
            } => ForwardMode::Train {
                dropout_seed: Some(site_seed(seed, id.0)),
            },
            other => other,
        };
        self.sites[id.0].forward(x, mode)
    }

    /// The trainable variables (lora_A then lora_B of each adapted site, in site order).
    pub fn trainable_vars(&self) -> Vec<Var> {
        self.sites
            .iter()
            .filter_map(|s| s.current())
            .flat_map(|c| [c.a().clone(), c.b().clone()])
            .collect()
    }

    /// Opens the base weight of every site whose path `select` accepts for
    /// full fine-tuning (see [`AdapterSite::open_base`]); returns how many.
    pub fn open_base_weights(&mut self, select: impl Fn(&str) -> bool) -> Result<usize> {
        let mut n = 0;
        for (path, site) in self.paths.iter().zip(&mut self.sites) {
            if select(path) {
                site.open_base()?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// The opened base weights by path, in site order.
    pub fn base_vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.iter()
            .filter_map(|(p, s)| s.base_var().map(|v| (p, v)))
    }

    /// Gives every targeted site a fresh adapter (A kaiming-uniform, B zeros),
    /// seeded: the same seed gives the same initial A everywhere.
    pub fn init_new_adapters(&mut self, cfg: &LoraConfig, seed: u64) -> Result<()> {
        cfg.validate()?;
        let mut n = 0;
        for (i, site) in self.sites.iter_mut().enumerate() {
            if !cfg.targets(&self.paths[i]) {
                continue;
            }
            let w = site.base().weight();
            let mut rng = rand::rngs::StdRng::seed_from_u64(site_seed(seed, i));
            let adapter = LoraAdapter::init(
                cfg,
                site.in_features(),
                site.out_features(),
                crate::device::adapter_dtype(w.dtype()),
                w.device(),
                &mut rng,
            )?;
            site.set_current(adapter)?;
            n += 1;
        }
        if n == 0 {
            return Err(self.no_target_error(cfg));
        }
        self.lora = Some(cfg.clone());
        Ok(())
    }

    fn no_target_error(&self, cfg: &LoraConfig) -> AdapterError {
        let mut names: Vec<&str> = self
            .paths
            .iter()
            .filter_map(|p| p.rsplit('.').next())
            .collect();
        names.sort_unstable();
        names.dedup();
        AdapterError::Config(format!(
            "`target_modules` {:?} match no layer of this model; its layers are named {:?}",
            cfg.target_modules, names
        ))
    }

    /// End of a task: every current adapter joins its site's frozen history.
    pub fn freeze_current_into_history(&mut self) -> Result<()> {
        for site in &mut self.sites {
            site.freeze_current()?;
        }
        Ok(())
    }

    /// Drops every current adapter without keeping it.
    pub fn clear_current(&mut self) {
        for site in &mut self.sites {
            site.clear_current();
        }
    }

    /// Folds every site's history into its base weight.
    pub fn merge_history_into_base(&mut self) -> Result<()> {
        for site in &mut self.sites {
            site.merge_history_into_base()?;
        }
        Ok(())
    }

    /// The current adapters in PEFT form.
    pub fn current_as_peft(&self, base_model_name_or_path: &str) -> Result<PeftAdapter> {
        let cfg = self.lora.as_ref().ok_or_else(|| {
            AdapterError::Config(
                "no current adapters to save: initialise or load them first".into(),
            )
        })?;
        let mut weights = BTreeMap::new();
        for (path, site) in self.adapted() {
            let c = site
                .current()
                .expect("adapted() yields sites with a current adapter");
            weights.insert(
                path.to_string(),
                (c.a().as_tensor().detach(), c.b().as_tensor().detach()),
            );
        }
        Ok(PeftAdapter {
            config: PeftConfig::causal_lm(
                cfg.r,
                cfg.alpha,
                cfg.dropout as f64,
                cfg.target_modules.clone(),
                base_model_name_or_path,
            ),
            weights,
        })
    }

    /// Saves the current adapters as a PEFT adapter directory.
    pub fn save_peft(&self, dir: &Path, base_model_name_or_path: &str) -> Result<()> {
        self.current_as_peft(base_model_name_or_path)?.save(dir)
    }

    /// Installs a PEFT adapter as the current (trainable) adapters; sites not
    /// named in it lose their current adapter.
    pub fn set_current_from_peft(&mut self, peft: &PeftAdapter) -> Result<()> {
        let adapters = self.check_peft(peft)?;
        self.clear_current();
        let dropout = peft.config.lora_dropout as f32;
        for (i, a, b) in adapters {
            let adapter = LoraAdapter::from_tensors(a, b, peft.config.lora_alpha, dropout)?;
            self.sites[i].set_current(adapter)?;
        }
        self.lora = Some(LoraConfig {
            r: peft.config.r,
            alpha: peft.config.lora_alpha,
            dropout,
            target_modules: peft.config.target_modules.clone(),
        });
        Ok(())
    }

    /// Appends a PEFT adapter (an earlier task's) to the frozen history of the sites it names.
    pub fn push_history_from_peft(&mut self, peft: &PeftAdapter) -> Result<()> {
        let scale = peft.config.scale();
        for (i, a, b) in self.check_peft(peft)? {
            self.sites[i].push_history(FrozenAdapter { a, b, scale })?;
        }
        Ok(())
    }

    /// Matches a PEFT adapter's modules to sites and checks shapes before anything changes.
    fn check_peft(&self, peft: &PeftAdapter) -> Result<Vec<(usize, Tensor, Tensor)>> {
        let mut out = Vec::new();
        for (module, (a, b)) in &peft.weights {
            let &i = self.index.get(module).ok_or_else(|| AdapterError::Site {
                site: module.clone(),
                message: "named by the adapter but not a linear layer of this model".into(),
            })?;
            let site = &self.sites[i];
            let w = site.base().weight();
            let fits = a.dims() == [peft.config.r, site.in_features()]
                && b.dims() == [site.out_features(), peft.config.r];
            if !fits {
                return Err(AdapterError::Site {
                    site: module.clone(),
                    message: format!(
                        "adapter lora_A {:?} / lora_B {:?} do not fit a layer with weight {:?} at r = {}",
                        a.shape(),
                        b.shape(),
                        w.shape(),
                        peft.config.r
                    ),
                });
            }
            let a = a
                .to_device(w.device())?
                .to_dtype(crate::device::adapter_dtype(w.dtype()))?;
            let b = b
                .to_device(w.device())?
                .to_dtype(crate::device::adapter_dtype(w.dtype()))?;
            out.push((i, a, b));
        }
        Ok(out)
    }
}
