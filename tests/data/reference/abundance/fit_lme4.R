# Reference fits of the sample-level binomial GLMM of differential abundance (run from the repository root):
#   Rscript tests/data/reference/abundance/fit_lme4.R
# Per cell type: glmer(cbind(k, N - k) ~ condition + (1|donor) + (1|sample), family = binomial) (Laplace ML,
# lme4's default nAGQ = 1); in the between-donor case each donor is one sample and the model is (1|donor) alone.
suppressPackageStartupMessages(library(lme4))
dir <- "tests/data/reference/abundance"
cases <- list(paired6 = "paired", between8 = "between", paired4 = "paired")
for (name in names(cases)) {
  d <- read.csv(file.path(dir, paste0("counts_", name, ".csv")))
  d$condition <- factor(d$condition, levels = c("ctrl", "case"))
  f <- if (cases[[name]] == "paired") {
    cbind(k, N - k) ~ condition + (1 | donor) + (1 | sample)
  } else {
    cbind(k, N - k) ~ condition + (1 | donor)
  }
  rows <- list()
  for (ct in unique(d$cell_type)) {
    sub <- d[d$cell_type == ct, ]
    fit <- glmer(f, data = sub, family = binomial,
                 control = glmerControl(optimizer = "bobyqa", optCtrl = list(maxfun = 1e5)))
    vc <- as.data.frame(VarCorr(fit))
    cf <- summary(fit)$coefficients
    rows[[ct]] <- data.frame(
      cell_type = ct,
      intercept = cf["(Intercept)", "Estimate"],
      coef = cf["conditioncase", "Estimate"],
      se = cf["conditioncase", "Std. Error"],
      var_donor = vc$vcov[vc$grp == "donor"],
      var_sample = if (any(vc$grp == "sample")) vc$vcov[vc$grp == "sample"] else NA,
      loglik = as.numeric(logLik(fit)),
      singular = isSingular(fit)
    )
  }
  out <- do.call(rbind, rows)
  write.csv(out, file.path(dir, paste0("lme4_", name, ".csv")), row.names = FALSE)
  print(name); print(out)
}
